/* Sortable and filterable tables for the report; written for this suite, inlined into the page (no network).
   Click (or Enter on) a header to sort by that column, again to reverse; cells sort by their leading number
   ("0.98 [0.97, 0.99]" sorts as 0.98, "1,024" as 1024), other text alphabetically after the numbers.
   An <input class="filter" data-table="ID"> hides the rows of table ID that lack any of its words. */
(function () {
  "use strict";
  var NUMBER = /^[-+\u2212]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?/i;

  function key(cell) {
    var text = (cell ? cell.textContent : "").trim();
    var m = text.replace(/,/g, "").match(NUMBER);
    return m ? parseFloat(m[0].replace("\u2212", "-")) : text.toLowerCase();
  }

  function compare(a, b) {
    var na = typeof a === "number", nb = typeof b === "number";
    if (na && nb) return a - b;
    if (na !== nb) return na ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }

  function sortable(table) {
    var body = table.tBodies[0];
    if (!body || !table.tHead || !table.tHead.rows.length) return;
    var heads = table.tHead.rows[table.tHead.rows.length - 1].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.tabIndex = 0;
      th.classList.add("sortable");
      th.title = "sort by this column";
      function sort() {
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var rows = Array.prototype.slice.call(body.rows).map(function (r, i) { return [key(r.cells[col]), i, r]; });
        rows.sort(function (x, y) { return dir * compare(x[0], y[0]) || x[1] - y[1]; });
        rows.forEach(function (x) { body.appendChild(x[2]); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  }

  function filterable(input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var count = document.getElementById(input.getAttribute("data-count"));
    if (!table || !table.tBodies[0]) return;
    input.hidden = false;
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean), shown = 0, rows = table.tBodies[0].rows;
      Array.prototype.forEach.call(rows, function (r) {
        var text = r.textContent.toLowerCase();
        var keep = words.every(function (w) { return text.indexOf(w) >= 0; });
        r.hidden = !keep;
        if (keep) shown += 1;
      });
      if (count) count.textContent = words.length ? shown + " of " + rows.length + " rows" : "";
    });
  }

  document.querySelectorAll("table.data").forEach(sortable);
  document.querySelectorAll("input.filter").forEach(filterable);
})();
