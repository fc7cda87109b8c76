// georelay console: replaces the live part of the page with what the server
// sends over server-sent events (already rendered HTML), without a reload.
// No build chain, no dependencies.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var badge = document.getElementById("conn");
  if (!live || !window.EventSource) { return; }
  function say(text, cls) {
    if (badge) { badge.textContent = text; badge.className = cls; }
  }
  var source = new EventSource(live.getAttribute("data-src"));
  source.addEventListener("page", function (e) {
    live.innerHTML = e.data;
    say("live " + new Date().toLocaleTimeString(), "ok");
  });
  source.onopen = function () { say("live", "ok"); };
  source.onerror = function () { say("reconnecting…", "bad"); };
})();
