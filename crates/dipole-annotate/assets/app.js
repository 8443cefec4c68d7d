// The annotation page: shows the next pair for this annotator, records A / B / tie (keys 1 / 2 / 3),
// an optional comment, and undo (u). The token comes from the page URL (?token=...).
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.search).get('token');
  let current = null;
  let busy = false;

  const setState = (state) => { document.body.dataset.state = state; };
  const message = (text, kind) => { $('message').textContent = text || ''; $('message').className = kind || ''; };

  async function api(method, path, body) {
    const init = { method, headers: { Authorization: 'Bearer ' + token } };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (response.status === 204) return null;
    let data = null;
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) throw new Error((data && data.error) || ('HTTP ' + response.status));
    return data;
  }

  function bubble(role, text) {
    const div = document.createElement('div');
    div.className = 'msg ' + role;
    const label = document.createElement('div');
    label.className = 'role';
    label.textContent = role;
    const body = document.createElement('div');
    body.className = 'text';
    body.textContent = text;
    div.append(label, body);
    return div;
  }

  // a string, or a conversation: a list of {role, content} messages
  function render(el, content, role) {
    el.replaceChildren();
    if (Array.isArray(content)) {
      for (const m of content) el.append(bubble(String(m.role), String(m.content)));
    } else if (role) {
      el.append(bubble(role, String(content)));
    } else {
      const body = document.createElement('div');
      body.className = 'text';
      body.textContent = String(content);
      el.append(body);
    }
  }

  function show(item) {
    current = item;
    $('item').textContent = item.item;
    $('task').dataset.item = item.item;
    render($('prompt'), item.prompt, 'user');
    render($('a'), item.a);
    render($('b'), item.b);
    $('comment').value = '';
    $('task').hidden = false;
    $('done').hidden = true;
  }

  async function progress() {
    const me = await api('GET', '/api/me');
    $('who').textContent = me.name;
    $('progress').textContent = `${me.judged} judged · ${me.left} left`;
  }

  async function loadNext() {
    const item = await api('GET', '/api/next');
    if (item) {
      show(item);
    } else {
      current = null;
      $('task').hidden = true;
      $('task').dataset.item = '';
      $('done').hidden = false;
    }
    await progress();
  }

  // one action at a time (a key pressed meanwhile is ignored); data-state tells when the page is
  // ready for the next one: ready (an item shown), done (nothing left), error, or busy
  async function run(action) {
    if (busy) return;
    busy = true;
    setState('busy');
    let failed = false;
    try {
      await action();
    } catch (e) {
      failed = true;
      message(e.message, 'error');
    } finally {
      busy = false;
      setState(failed ? 'error' : current ? 'ready' : 'done');
    }
  }

  const names = { a: 'A', b: 'B', tie: 'tie' };
  const choose = (choice) => run(async () => {
    if (!current) return;
    const comment = $('comment').value.trim();
    const body = { item: current.item, choice };
    if (comment) body.comment = comment;
    await api('POST', '/api/judgments', body);
    const item = current.item;
    await loadNext();
    message(`Recorded ${names[choice]} for item ${item}.`, 'ok');
  });

  const undo = () => run(async () => {
    const r = await api('POST', '/api/undo');
    show(r.shown);
    if (r.undone.comment) $('comment').value = r.undone.comment;
    message(`Undid your ${names[r.undone.choice]} on item ${r.undone.item}: choose again.`, 'ok');
    await progress();
  });

  document.addEventListener('keydown', (e) => {
    if (e.target === $('comment')) {
      if (e.key === 'Escape') $('comment').blur();
      return;
    }
    if (e.altKey || e.repeat) return;
    if (e.ctrlKey || e.metaKey) {
      if (e.key === 'z') { e.preventDefault(); undo(); }
      return;
    }
    const keys = { '1': () => choose('a'), '2': () => choose('b'), '3': () => choose('tie'), u: undo };
    if (keys[e.key]) {
      e.preventDefault();
      keys[e.key]();
    } else if (e.key === 'c' && current) {
      e.preventDefault();
      $('comment').focus();
    }
  });
  for (const button of document.querySelectorAll('[data-choice]')) {
    button.addEventListener('click', () => choose(button.dataset.choice));
  }
  $('undo').addEventListener('click', undo);

  if (!token) {
    message('This page needs the address the server printed for you (it ends in ?token=...).', 'error');
    setState('error');
    return;
  }
  $('stats-link').href = '/stats?token=' + encodeURIComponent(token);
  run(loadNext);
})();
