// edgepack model health: the project's only script. Live refresh: when "live" is ticked (remembered in this
// browser), the page reloads every data-refresh seconds, unless a form field is being edited.
(function () {
  "use strict";
  var box = document.getElementById("live");
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  if (!box || !seconds) { return; }
  box.checked = window.localStorage.getItem("edgepack-live") !== "off";
  box.addEventListener("change", function () {
    window.localStorage.setItem("edgepack-live", box.checked ? "on" : "off");
  });
  function editing() {
    var el = document.activeElement;
    return el && (el.tagName === "TEXTAREA" || el.tagName === "INPUT" || el.tagName === "SELECT") && el !== box;
  }
  function tick() {
    var reason = document.getElementById("reason");
    if (box.checked && !document.hidden && !editing() && !(reason && reason.value)) {
      window.location.reload();
      return;
    }
    window.setTimeout(tick, seconds * 1000);
  }
  window.setTimeout(tick, seconds * 1000);
})();
