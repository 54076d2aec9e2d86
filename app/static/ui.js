// Live progress bars: poll each unfinished run's progress (cookie-authenticated) until it ends.
(function () {
  "use strict";
  var POLL_MS = 2000;

  function poll(el) {
    var url = el.getAttribute("data-progress-url");
    fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (res) { return res.ok ? res.json() : null; })
      .then(function (p) {
        if (!p) { return; }
        el.querySelector(".bar").style.width = (p.progress * 100).toFixed(1) + "%";
        el.querySelector(".label").textContent = p.label;
        var row = el.closest("[data-run-id]");
        var badge = row ? row.querySelector(".state") : document.getElementById("run-state");
        if (badge) {
          badge.textContent = p.state;
          badge.className = "state state-" + p.state.toLowerCase();
        }
        if (p.terminal) {
          el.setAttribute("data-terminal", "true");
          // A run page shows results only once the run has ended: reload it then.
          if (!row && p.state === "SUCCEEDED" && !document.getElementById("cluster-grid")) {
            window.location.reload();
          }
          return;
        }
        setTimeout(function () { poll(el); }, POLL_MS);
      })
      .catch(function () { setTimeout(function () { poll(el); }, POLL_MS * 3); });
  }

  document.querySelectorAll(".progress[data-progress-url]").forEach(function (el) {
    if (el.getAttribute("data-terminal") !== "true") { setTimeout(function () { poll(el); }, POLL_MS); }
  });
})();
