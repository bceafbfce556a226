// meshq web view: refresh the page's live part without a reload.
// The server renders it (every value escaped there); this only swaps it in. Nothing is
// kept between polls, and a hidden tab does not poll.
(function () {
  "use strict";
  function schedule() {
    var live = document.getElementById("live");
    var interval = live && parseInt(live.getAttribute("data-poll"), 10);
    if (interval > 0) { window.setTimeout(poll, interval); }
  }
  function poll() {
    if (document.hidden) { schedule(); return; }
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    fetch(url.toString(), { credentials: "same-origin", cache: "no-store" })
      .then(function (reply) {
        if (reply.status === 401) { window.location.reload(); return null; }
        return reply.ok ? reply.text() : null;
      })
      .then(function (html) {
        var live = document.getElementById("live");
        if (html !== null && live) {
          // the results the reader opened stay open
          var opened = Array.prototype.map.call(live.querySelectorAll("details[open][data-node]"),
            function (d) { return d.getAttribute("data-node"); });
          var parsed = new DOMParser().parseFromString('<div id="live">' + html + "</div>", "text/html");
          var fresh = parsed.getElementById("live");
          live.replaceChildren.apply(live, Array.prototype.slice.call(fresh.childNodes));
          Array.prototype.forEach.call(live.querySelectorAll("details[data-node]"), function (d) {
            if (opened.indexOf(d.getAttribute("data-node")) >= 0) { d.open = true; }
          });
          if (!live.querySelector("#cancel") && live.querySelector("#summary")) {
            // a finished run: nothing more will change
            var state = live.querySelector("#summary").getAttribute("data-state");
            if (["SUCCESS", "FAILURE", "CANCELLED"].indexOf(state) >= 0) { live.removeAttribute("data-poll"); }
          }
        }
      })
      .catch(function () { /* the server restarts: try again at the next tick */ })
      .then(schedule);
  }
  document.addEventListener("DOMContentLoaded", schedule);
})();
