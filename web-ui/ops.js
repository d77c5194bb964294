// Agents with fitness per generation, upstream sync with its backlog over time, and the
// gateway's identity.
import { api, h, section, table, errorBox, time, plot } from './lib.js';

export async function agentsScreen(root) {
  const list = h('div', { id: 'agents' });
  const plots = h('div', { class: 'plots', id: 'agent-plots' });
  root.append(section('Agents', list), section('Fitness per generation (best; lower is better)', plots));
  const made = [];
  try {
    const r = await api('GET', '/api/zeq/agent/list');
    list.replaceChildren(table(['agent', 'machine', 'problem', 'status', 'generation', 'best fitness', 'created'],
      r.agents.map((a) => h('tr', {},
        h('td', { class: 'mono small' }, a.agent_id), h('td', {}, a.slug), h('td', { class: 'mono' }, a.problem),
        h('td', {}, a.status), h('td', {}, a.generation ?? '–'), h('td', {}, a.best_fitness ?? '–'),
        h('td', {}, time(a.created_at)))),
      'No agents: spawn one with POST /api/zeq/agent/spawn.'));
    for (const a of r.agents.slice(0, 12)) {
      const box = h('div', { class: 'plot' });
      plots.append(h('div', {}, h('h3', {}, `${a.problem} · ${a.agent_id.slice(0, 8)}`), box));
      const l = await api('GET', `/api/zeq/agent/lineage/${encodeURIComponent(a.agent_id)}`);
      const p = plot(box, { series: [{ label: 'best fitness', points: true }], yLabel: 'fitness', xTime: false });
      p.set([l.lineage.map((g) => g.generation), l.lineage.map((g) => g.best_fitness)]);
      made.push(p);
    }
    if (!r.agents.length) plots.append(h('p', { class: 'muted' }, 'Nothing to plot.'));
  } catch (e) {
    list.replaceChildren(errorBox(e));
  }
  return () => made.forEach((p) => p.destroy());
}

export async function syncScreen(root) {
  const status = h('div', { id: 'sync' });
  const box = h('div', { class: 'plot', id: 'plot-backlog' });
  root.append(section('Upstream sync', status),
    section('Backlog over time (sampled every 5 s while this screen is open)', box));
  const p = plot(box, {
    series: [{ label: 'backlog rows', points: true }, { label: 'backlog KiB', color: '#1a7f37', points: true }],
    yLabel: 'backlog',
    minSpan: 120,
  });
  const xs = []; const rows = []; const kib = [];
  async function sample() {
    try {
      const r = await api('GET', '/api/sync/status');
      const total = r.machines.reduce((n, m) => n + (m.backlog_rows || 0), 0);
      const bytes = r.machines.reduce((n, m) => n + (m.backlog_bytes || 0), 0);
      xs.push(Date.now() / 1000); rows.push(total); kib.push(bytes / 1024);
      if (xs.length > 720) { xs.shift(); rows.shift(); kib.shift(); }
      p.set([xs.slice(), rows.slice(), kib.slice()]);
      status.replaceChildren(
        h('dl', {},
          h('dt', {}, 'Upstream'), h('dd', { class: 'mono' }, r.enabled ? r.upstream : 'not configured (upstream.url)'),
          h('dt', {}, 'Over quota'), h('dd', { class: r.over_quota ? 'bad' : '' }, r.over_quota ? 'yes' : 'no'),
          h('dt', {}, 'Quota'), h('dd', {}, `${Math.round(r.backlog_quota_bytes / 1024)} KiB`)),
        table(['machine', 'log size', 'acked', 'backlog rows', 'backlog bytes', 'last success', 'last error', 'next retry'],
          r.machines.map((m) => h('tr', {},
            h('td', {}, m.slug), h('td', {}, m.log_size), h('td', {}, m.acked_size), h('td', {}, m.backlog_rows),
            h('td', {}, m.backlog_bytes), h('td', {}, time(m.last_success)),
            h('td', { class: m.last_error ? 'bad' : '' }, m.last_error ? `${m.last_error_code || ''} ${m.last_error}` : '–'),
            h('td', {}, time(m.next_retry)))),
          'No machines to sync (sync status lists machines you administer).'));
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  }
  await sample();
  const t = setInterval(sample, 5000);
  return () => { clearInterval(t); p.destroy(); };
}

export async function gatewayScreen(root) {
  const dl = h('dl', { id: 'gateway' });
  root.append(section('Gateway', dl));
  const g = await api('GET', '/api/gateway');
  const item = (k, v, cls) => [h('dt', {}, k), h('dd', { class: cls }, v)];
  dl.append(
    ...item('Identity', g.gateway_id, 'mono'),
    ...item('Public key', g.public_key, 'mono'),
    ...item('Note verifier key', g.verifier_key, 'mono'),
    ...item('Version', g.version),
    ...item('Region', g.region),
    ...item('Up since', time(g.started_at)),
    ...item('Uptime', `${g.uptime_seconds} s`),
    ...item('Machines', String(g.machines)),
  );
}
