# The georelay binary on a slim Debian. Build: docker build -t georelay .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Without default features: no `chaos drill`, no test kit in the image.
RUN cargo build --release --locked --no-default-features --bin georelay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/georelay --create-home georelay \
 && install -d -o georelay -g georelay -m 700 /var/lib/georelay/devices
COPY --from=build /src/target/release/georelay /usr/local/bin/georelay
COPY deploy/bootstrap.sh /usr/local/bin/georelay-bootstrap
USER georelay
WORKDIR /var/lib/georelay
ENTRYPOINT ["georelay"]
