// The stats page: /api/stats as tables, refreshed every 5 seconds.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.search).get('token');
  const fmt = (x) => (x === null || x === undefined ? '–' : x.toFixed(3));
  const pct = (x) => (x === null || x === undefined ? '–' : (100 * x).toFixed(0) + '%');

  function rows(table, data) {
    const body = $(table).querySelector('tbody');
    body.replaceChildren();
    for (const cells of data) {
      const tr = document.createElement('tr');
      for (const cell of cells) {
        const td = document.createElement('td');
        td.textContent = String(cell);
        tr.append(td);
      }
      body.append(tr);
    }
  }

  async function refresh() {
    try {
      const r = await fetch('/api/stats', { headers: { Authorization: 'Bearer ' + token } });
      const s = await r.json();
      if (!r.ok) throw new Error(s.error || ('HTTP ' + r.status));
      $('summary').textContent = `${s.done} of ${s.items} items done (${s.per_item} judgments each) · ${s.judgments} judgments`;
      $('fleiss').textContent = fmt(s.fleiss_kappa);
      $('alpha').textContent = fmt(s.krippendorff_alpha);
      rows('annotators', s.annotators.map((a) => [a.name, a.judged, a.left, a.first, a.second, a.tie]));
      rows('pairs', s.pairs.map((p) => [`${p.a} · ${p.b}`, p.items, pct(p.agreement), fmt(p.kappa)]));
      $('message').textContent = '';
      document.body.dataset.state = 'ready';
    } catch (e) {
      $('message').textContent = e.message;
      $('message').className = 'error';
      document.body.dataset.state = 'error';
    }
  }

  if (!token) {
    $('message').textContent = 'This page needs ?token=... (any annotator\'s token).';
    $('message').className = 'error';
    document.body.dataset.state = 'error';
    return;
  }
  $('back').href = '/?token=' + encodeURIComponent(token);
  refresh();
  setInterval(refresh, 5000);
})();
