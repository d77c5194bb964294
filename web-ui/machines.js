// Machines: the list and spin-up (whose machine key is shown once), one machine's instances
// with live states, definitions, rates, its log and dead letters, and one instance's timeline.
import { api, h, section, table, errorBox, time, readFile, rate, plot } from './lib.js';

const enc = encodeURIComponent;

export async function machinesScreen(root) {
  const list = h('div', {});
  const created = h('div', { id: 'new-key' });
  const form = h('form', { id: 'create-machine', class: 'row' },
    h('label', {}, 'Slug ', h('input', { name: 'slug', pattern: '[a-z0-9-]{1,64}', placeholder: 'kitchen', required: true })),
    h('label', {}, 'Name ', h('input', { name: 'display_name', placeholder: 'Kitchen sensors' })),
    h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'is_public' }), ' public'),
    h('button', { type: 'submit' }, 'Create machine'));
  const msg = h('div', {});
  root.append(
    section('Machines', list),
    section('Create a machine', form, msg, created),
  );

  async function load() {
    try {
      const r = await api('GET', '/api/chain/state-machines');
      list.replaceChildren(table(['slug', 'name', 'visibility', 'status', 'created'],
        r.machines.map((m) => h('tr', {},
          h('td', {}, h('a', { href: `#/m/${enc(m.slug)}`, class: 'machine-link' }, m.slug)),
          h('td', {}, m.display_name || ''),
          h('td', {}, m.is_public ? 'public' : 'private'),
          h('td', {}, m.status),
          h('td', {}, time(m.created_at)))),
        'No machines yet: create one below.'));
    } catch (e) {
      list.replaceChildren(errorBox(e));
    }
  }

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    msg.replaceChildren();
    const f = new FormData(form);
    const body = { slug: f.get('slug'), is_public: f.get('is_public') === 'on' };
    if (f.get('display_name')) body.display_name = f.get('display_name');
    try {
      const r = await api('POST', '/api/chain/state-machines', body);
      form.reset();
      showKeyOnce(created, r.machine.slug, r.api_key);
      load();
    } catch (e) {
      msg.append(errorBox(e));
    }
  });
  await load();
}

// The machine key exists only in this box: "Done" removes it from the page, and nothing
// keeps a copy (the gateway stores only its hash and never returns it again).
function showKeyOnce(box, slug, key) {
  let raw = key;
  const code = h('code', { class: 'key', id: 'machine-key' }, raw);
  const copied = h('span', { class: 'muted' });
  const done = () => { raw = null; box.replaceChildren(); };
  box.replaceChildren(h('div', { class: 'once', role: 'alert' },
    h('strong', {}, `Machine key for ${slug}: copy it now, it will not be shown again.`),
    code,
    h('div', { class: 'row' },
      h('button', {
        type: 'button',
        onclick: async () => {
          try { await navigator.clipboard.writeText(raw); copied.textContent = 'copied'; } catch {
            const r = document.createRange(); r.selectNodeContents(code);
            const s = getSelection(); s.removeAllRanges(); s.addRange(r);
            copied.textContent = 'selected: press Ctrl+C';
          }
        },
      }, 'Copy'),
      h('button', { type: 'button', id: 'key-done', onclick: done }, 'Done, I have stored it'),
      copied),
    h('p', { class: 'small' }, 'Devices and scripts use it as ', h('code', {}, 'Authorization: Bearer …'), '.')));
  // Leaving the screen forgets it too.
  window.addEventListener('hashchange', done, { once: true });
}

export async function machineScreen(root, [slug]) {
  const streams = new Map(); // instance slug → EventSource
  const timers = [];
  const rows = new Map(); // instance slug → {state, updated, tr}
  const events = new Map(); // instance slug → {cursor, times: {hb: [], tr: []}}
  let log = null;
  let closed = false;

  const head = h('div', { class: 'row between' },
    h('h2', { class: 'title' }, `Machine ${slug}`),
    h('a', { href: `#/m/${enc(slug)}/pages`, id: 'pages-link' }, 'Pages →'));
  const info = h('div', {});
  const instTable = h('tbody', {});
  const instBox = h('div', { class: 'scroll' }, h('table', { id: 'instances' },
    h('thead', {}, h('tr', {}, ['instance', 'state', 'status', 'updated', 'live'].map((x) => h('th', {}, x)))),
    instTable));
  const newInst = h('form', { class: 'row', id: 'create-instance' },
    h('input', { name: 'slug', placeholder: 'instance slug, e.g. fridge-1', required: true }),
    h('button', { type: 'submit' }, 'Create instance'));
  const instMsg = h('div', {});
  const upload = h('form', { class: 'row', id: 'upload-version' },
    h('input', { type: 'file', name: 'file', accept: '.json,application/json', required: true }),
    h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'current', checked: true }), ' make current'),
    h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'auto', checked: true }), ' create instances from MQTT'),
    h('button', { type: 'submit' }, 'Upload definition'));
  const upMsg = h('div', {});
  const versions = h('div', {});
  const hbPlot = h('div', { class: 'plot', id: 'plot-heartbeats' });
  const trPlot = h('div', { class: 'plot', id: 'plot-transitions' });
  const logBox = h('div', { id: 'log' });
  const dead = h('div', { id: 'dead-letters' });

  root.append(
    head,
    section('Instances', h('p', { class: 'muted small' }, 'States update live (server-sent events).'), instBox, newInst, instMsg),
    section('Rates (last 10 minutes, per 10 s)',
      h('div', { class: 'plots' },
        h('div', {}, h('h3', {}, 'Heartbeats'), hbPlot),
        h('div', {}, h('h3', {}, 'Transitions'), trPlot))),
    section('Statechart definitions', info, versions, upload, upMsg),
    section('Log', logBox),
    section('Dead letters (MQTT)', dead),
  );
  const hb = plot(hbPlot, { series: [{ label: 'heartbeats / 10 s' }], yLabel: 'count' });
  const tr = plot(trPlot, { series: [{ label: 'transitions / 10 s', color: '#d1242f' }], yLabel: 'count' });

  function redrawRates() {
    const all = { hb: [], tr: [] };
    for (const e of events.values()) { all.hb.push(...e.times.hb); all.tr.push(...e.times.tr); }
    hb.set(rate(all.hb, 10000, 600000));
    tr.set(rate(all.tr, 10000, 600000));
  }

  // Transition history since the last one seen, for the rate plots.
  async function fetchEvents(inst) {
    const e = events.get(inst) || { cursor: null, times: { hb: [], tr: [] }, busy: false };
    events.set(inst, e);
    if (e.busy) { e.again = true; return; }
    e.busy = true;
    try {
      for (;;) {
        const q = e.cursor === null ? '?limit=1000' : `?limit=1000&cursor=${e.cursor}`;
        const r = await api('GET', `/machines/${enc(slug)}/i/${enc(inst)}/events${q}`);
        for (const ev of r.events) {
          e.cursor = ev.n;
          if (ev.event && ev.event.type === 'HEARTBEAT') e.times.hb.push(ev.ts);
          if (!same(ev.from, ev.to)) e.times.tr.push(ev.ts);
        }
        if (r.events.length < 1000) break;
      }
    } catch { /* the next update retries */ }
    e.busy = false;
    if (e.again) { e.again = false; return fetchEvents(inst); }
    redrawRates();
  }

  function setRow(inst, view) {
    const r = rows.get(inst);
    if (!r) return;
    r.state.textContent = typeof view.state === 'string' ? view.state : JSON.stringify(view.state);
    r.updated.textContent = time(view.ts);
    r.tr.dataset.state = r.state.textContent;
    r.live.textContent = 'live';
    r.live.className = 'pill ok';
  }

  function watch(inst) {
    if (streams.has(inst) || closed) return;
    const es = new EventSource(`/machines/${enc(slug)}/i/${enc(inst)}/sse`);
    es.addEventListener('instance-update', (m) => {
      try { setRow(inst, JSON.parse(m.data)); } catch { /* ignore a bad frame */ }
      fetchEvents(inst);
    });
    es.onerror = () => {
      const r = rows.get(inst);
      if (r) { r.live.textContent = 'reconnecting'; r.live.className = 'pill warn'; }
    };
    streams.set(inst, es);
  }

  async function loadInstances() {
    try {
      const r = await api('GET', `/machines/${enc(slug)}/i?limit=200`);
      for (const i of r.instances) {
        if (!rows.has(i.slug)) {
          const row = {
            state: h('td', { class: 'state' }, '…'),
            updated: h('td', {}, time(i.updatedAt)),
            live: h('span', { class: 'pill' }, 'connecting'),
          };
          row.status = h('td', {}, i.status);
          row.tr = h('tr', { dataset: { instance: i.slug } },
            h('td', {}, h('a', { href: `#/m/${enc(slug)}/i/${enc(i.slug)}` }, i.slug)),
            row.state, row.status, row.updated, h('td', {}, row.live));
          rows.set(i.slug, row);
          instTable.append(row.tr);
        } else {
          rows.get(i.slug).status.textContent = i.status;
        }
        // One stream per instance; the first 50 are watched live.
        if (streams.size < 50) watch(i.slug);
      }
      if (!r.instances.length && !instTable.children.length) {
        instTable.append(h('tr', { class: 'empty' }, h('td', { colspan: 5, class: 'muted' },
          'No instances yet: create one, or publish to smgate/' + slug + '/<instance>/heartbeat over MQTT.')));
      } else {
        for (const e of instTable.querySelectorAll('tr.empty')) e.remove();
      }
    } catch (e) {
      instMsg.replaceChildren(errorBox(e));
    }
  }

  async function loadDefinitions() {
    try {
      const m = await api('GET', `/machines/${enc(slug)}`);
      info.replaceChildren(h('p', {},
        'Current version: ', h('strong', { id: 'current-version' }, m.currentVersion ? `#${m.currentVersion.number} (${m.currentVersion.clientInfo || m.currentVersion.id})` : 'none'),
        ' · instances from MQTT: ', h('strong', {}, m.autoCreateInstances ? 'created automatically' : 'must exist')));
      const v = await api('GET', `/machines/${enc(slug)}/v`);
      versions.replaceChildren(table(['#', 'label', 'id', 'uploaded'],
        v.versions.map((x) => h('tr', {}, h('td', {}, x.number), h('td', {}, x.clientInfo || ''),
          h('td', { class: 'mono small' }, x.id), h('td', {}, time(x.createdAt)))),
        'No definition uploaded yet.'));
    } catch (e) {
      info.replaceChildren(errorBox(e));
    }
  }

  async function loadLog() {
    const base = `/api/chain/state-machines/${enc(slug)}`;
    const parts = await Promise.allSettled([
      api('GET', `${base}/state`), api('GET', `${base}/checkpoint`), api('GET', `${base}/pohc/validate`),
    ]);
    const [state, cp, valid] = parts.map((p) => (p.status === 'fulfilled' ? p.value : p.reason));
    const size = state && (state.log_size ?? state.size ?? state.tree_size ?? (state.state && state.state.log_size));
    const ok = valid && (valid.valid ?? valid.ok);
    logBox.replaceChildren(
      h('dl', {},
        h('dt', {}, 'Size'), h('dd', { id: 'log-size' }, size ?? '–'),
        h('dt', {}, 'pohc/validate'), h('dd', { id: 'log-valid', class: ok ? 'good' : 'bad' },
          valid instanceof Error ? valid.message : `${ok ? 'valid' : 'INVALID'}${valid.rows !== undefined ? ` (${valid.rows} rows)` : ''}`)),
      h('h3', {}, 'Checkpoint (signed note)'),
      h('pre', { class: 'note', id: 'checkpoint' }, cp instanceof Error ? cp.message
        : typeof cp === 'string' ? cp : (cp.note || cp.checkpoint || JSON.stringify(cp, null, 2))),
      h('details', {}, h('summary', {}, 'validation details'), h('pre', {}, JSON.stringify(valid, null, 2))));
  }

  async function loadDead() {
    try {
      const r = await api('GET', `/api/chain/state-machines/${enc(slug)}/dead-letters?limit=50`);
      dead.replaceChildren(table(['#', 'when', 'topic', 'reason', 'message', 'payload'],
        r.dead_letters.map((d) => h('tr', {}, h('td', {}, d.n), h('td', {}, time(d.ts)), h('td', { class: 'mono' }, d.topic),
          h('td', {}, d.reason), h('td', {}, d.message), h('td', { class: 'mono small' }, d.payload + (d.truncated ? '…' : '')))),
        'No dead letters.'));
    } catch (e) {
      dead.replaceChildren(errorBox(e));
    }
  }

  newInst.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    instMsg.replaceChildren();
    try {
      await api('POST', `/machines/${enc(slug)}`, { slug: new FormData(newInst).get('slug') });
      newInst.reset();
      loadInstances();
    } catch (e) {
      instMsg.append(errorBox(e));
    }
  });

  upload.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    upMsg.replaceChildren();
    try {
      const f = await readFile(upload.elements.file);
      let definition;
      try { definition = JSON.parse(f.text); } catch (e) { throw new Error(`${f.name} is not JSON: ${e.message}`); }
      const r = await api('POST', `/machines/${enc(slug)}/v`, {
        definition, clientInfo: f.name, makeCurrent: upload.elements.current.checked,
        autoCreateInstances: upload.elements.auto.checked,
      });
      upMsg.append(h('p', { class: 'good', id: 'upload-ok' }, `Uploaded ${f.name} as version ${r.number}.`));
      upload.reset();
      loadDefinitions();
    } catch (e) {
      upMsg.append(errorBox(e));
    }
  });

  // The machine's log stream tells us when anything changed (new instances from MQTT, new
  // dead letters, new rows): reload the lists, debounced.
  let pending = null;
  const changed = () => {
    if (pending) return;
    pending = setTimeout(() => { pending = null; loadInstances(); loadLog(); loadDead(); }, 500);
  };
  try {
    log = new EventSource(`/api/chain/state-machines/${enc(slug)}/explore/sse`);
    log.onmessage = changed;
    log.addEventListener('row', changed);
  } catch { /* polling below still works */ }
  timers.push(setInterval(() => { loadInstances(); loadDead(); }, 10000));
  timers.push(setInterval(redrawRates, 10000));

  await Promise.all([loadInstances(), loadDefinitions(), loadLog(), loadDead()]);
  redrawRates();
  return () => {
    closed = true;
    for (const es of streams.values()) es.close();
    if (log) log.close();
    for (const t of timers) clearInterval(t);
    if (pending) clearTimeout(pending);
    hb.destroy();
    tr.destroy();
  };
}

export async function instanceScreen(root, [slug, inst]) {
  const state = h('strong', { id: 'instance-state' }, '…');
  const ctxBox = h('pre', { id: 'instance-context' });
  const tbody = h('tbody', {});
  const more = h('p', {});
  let cursor = null;
  root.append(
    h('p', {}, h('a', { href: `#/m/${enc(slug)}` }, `← ${slug}`)),
    section(`Instance ${inst}`, h('p', {}, 'State: ', state, ' ', h('span', { class: 'pill', id: 'instance-live' }, 'connecting')), ctxBox),
    section('Transition timeline', h('div', { class: 'scroll' }, h('table', { id: 'timeline' },
      h('thead', {}, h('tr', {}, ['#', 'when', 'event', 'from', '', 'to', 'log seq'].map((x) => h('th', {}, x)))),
      tbody)), more),
  );
  const row = (e) => h('tr', { class: same(e.from, e.to) ? '' : 'moved' },
    h('td', {}, e.n), h('td', {}, time(e.ts)), h('td', { class: 'mono' }, e.event && e.event.type),
    h('td', {}, fmtState(e.from)), h('td', {}, '→'), h('td', {}, fmtState(e.to)), h('td', {}, e.seq ?? ''));
  async function fetchNew() {
    for (;;) {
      const q = cursor === null ? '?limit=500' : `?limit=500&cursor=${cursor}`;
      const r = await api('GET', `/machines/${enc(slug)}/i/${enc(inst)}/events${q}`);
      // Newest first on screen.
      for (const e of r.events) { cursor = e.n; tbody.prepend(row(e)); }
      if (r.events.length < 500) break;
    }
    if (!tbody.children.length) more.textContent = 'No transitions yet.';
    else more.textContent = '';
  }
  const es = new EventSource(`/machines/${enc(slug)}/i/${enc(inst)}/sse`);
  const live = () => document.getElementById('instance-live');
  es.addEventListener('instance-update', (m) => {
    try {
      const v = JSON.parse(m.data);
      state.textContent = fmtState(v.state);
      ctxBox.textContent = JSON.stringify({ publicContext: v.publicContext, tags: v.tags, done: v.done }, null, 2);
      const l = live(); if (l) { l.textContent = 'live'; l.className = 'pill ok'; }
    } catch { /* ignore */ }
    fetchNew().catch(() => {});
  });
  es.onerror = () => { const l = live(); if (l) { l.textContent = 'reconnecting'; l.className = 'pill warn'; } };
  await fetchNew();
  return () => es.close();
}

function fmtState(s) {
  return typeof s === 'string' ? s : JSON.stringify(s);
}

function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}
