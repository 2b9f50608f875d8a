// Live updates for the job page: the dashboard re-renders the page body on
// each change of the job (the coordinator's WatchJob stream) and sends it as
// a server-sent event; this swaps it in. Without this script the pages are
// still complete, only static.
(function () {
  "use strict";
  var body = document.getElementById("job-body");
  if (!body || !window.EventSource) { return; }
  var terminal = { succeeded: true, failed: true, cancelled: true };
  if (terminal[body.dataset.state]) { return; }
  // What the page showed when it loaded, and how many updates came since.
  window.confideDashboard = { loadedRounds: Number(body.dataset.rounds), updates: 0, ended: false };
  var source = new EventSource("/jobs/" + encodeURIComponent(body.dataset.job) + "/events");
  source.addEventListener("status", function (e) {
    var holder = document.createElement("div");
    holder.innerHTML = e.data;
    var next = holder.firstElementChild;
    var current = document.getElementById("job-body");
    if (!next || !current) { return; }
    current.replaceWith(next);
    window.confideDashboard.updates += 1;
    if (terminal[next.dataset.state]) { source.close(); window.confideDashboard.ended = true; }
  });
  source.addEventListener("failure", function (e) {
    var p = document.createElement("p");
    p.className = "error";
    p.textContent = "Live updates stopped: " + e.data;
    document.querySelector("main").prepend(p);
    source.close();
  });
  source.addEventListener("end", function () { source.close(); window.confideDashboard.ended = true; });
})();
