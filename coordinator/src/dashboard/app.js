// Live updates for the job page: the dashboard re-renders the page body on
// each change of the job (the coordinator's WatchJob stream) and sends it as
// a server-sent event; this swaps it in. The stream ends with an `end` event
// once the job has ended. Without this script the pages are still complete,
// only static.
(function () {
  "use strict";
  var body = document.getElementById("job-body");
  if (!body || !window.EventSource) { return; }
  var terminal = { succeeded: true, failed: true, cancelled: true };
  if (terminal[body.dataset.state]) { return; }
  // What the page showed when it loaded, how many updates came since, and
  // whether the server ended the stream.
  var state = { loadedRounds: Number(body.dataset.rounds), updates: 0, ended: false };
  window.confideDashboard = state;
  var source = new EventSource("/jobs/" + encodeURIComponent(body.dataset.job) + "/events");
  function notice(text) {
    var p = document.createElement("p");
    p.className = "error";
    p.textContent = text;
    document.querySelector("main").prepend(p);
  }
  source.addEventListener("status", function (e) {
    var holder = document.createElement("div");
    holder.innerHTML = e.data;
    var next = holder.firstElementChild;
    var current = document.getElementById("job-body");
    if (!next || !current) { return; }
    current.replaceWith(next);
    state.updates += 1;
  });
  source.addEventListener("end", function () { source.close(); state.ended = true; });
  source.addEventListener("failure", function (e) {
    source.close();
    notice("Live updates stopped: " + e.data);
  });
  source.addEventListener("error", function () {
    // The browser retries a dropped stream by itself; say so only when it
    // has given up.
    if (source.readyState === EventSource.CLOSED && !state.ended) {
      notice("Live updates stopped: the dashboard cannot be reached. Reload the page to retry.");
    }
  });
})();
