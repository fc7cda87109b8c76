#!/bin/sh
# Registers a demo control plane, idempotently: one namespace per region, one
# group on the first, a few devices whose keys are written to $KEY_DIR.
# Used by `./dev up` and by docker-compose.yml's `bootstrap` service.
#
# Environment:
#   DATABASE_URL, GEORELAY_MASTER_KEY   as for every georelay command
#   GEORELAY        the georelay binary (default: georelay on the PATH)
#   REGIONS         "name=endpoint=priority ..." (space-separated)
#   GROUP, QUEUE    the demo group and its queue (default demo, telemetry)
#   DEVICES         device ids (space-separated)
#   KEY_DIR         where each new device's key is written as ID.key (mode 600)
set -eu

GEORELAY=${GEORELAY:-georelay}
GROUP=${GROUP:-demo}
QUEUE=${QUEUE:-telemetry}
: "${REGIONS:?REGIONS must list name=endpoint=priority}"
: "${DEVICES:?DEVICES must list device ids}"
: "${KEY_DIR:?KEY_DIR must name a directory}"
err=$(mktemp)
trap 'rm -f "$err"' EXIT

# Exit code 3 means "already exists": success for an idempotent set-up.
idempotent() {
  rc=0
  "$@" >/dev/null 2>"$err" || rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then cat "$err" >&2; exit $rc; fi
}

"$GEORELAY" migrate >/dev/null
first=
for spec in $REGIONS; do
  name=${spec%%=*}; rest=${spec#*=}; endpoint=${rest%=*}; priority=${rest##*=}
  [ -n "$first" ] || first=$name
  idempotent "$GEORELAY" admin namespace add --name "$name" --region "$name" --transport nats \
    --endpoint "$endpoint" --priority "$priority"
done
idempotent "$GEORELAY" admin group add --name "$GROUP" --queue "$QUEUE" --namespace "$first"

mkdir -p "$KEY_DIR"
for device in $DEVICES; do
  [ -s "$KEY_DIR/$device.key" ] && continue
  rc=0
  key=$("$GEORELAY" admin device add --id "$device" --group "$GROUP" 2>"$err") || rc=$?
  if [ $rc -eq 0 ]; then
    (umask 077; printf '%s\n' "$key" >"$KEY_DIR/$device.key")
  elif [ $rc -eq 3 ]; then
    echo "bootstrap: device $device exists but $KEY_DIR/$device.key does not; its key was shown once when it was added" >&2
  else
    cat "$err" >&2; exit $rc
  fi
done
