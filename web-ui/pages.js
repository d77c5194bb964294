// A machine's pages: list, preview in a sandboxed frame, publish from a file, history and
// rollback. Published pages run in an opaque origin (their CSP and the frame's sandbox), so
// a page's scripts never see the console's cookie.
import { api, h, section, table, errorBox, time, readFile } from './lib.js';

const enc = encodeURIComponent;

export async function pagesScreen(root, [slug], ctx) {
  const base = `/api/state-machines/${enc(slug)}/pages`;
  const list = h('div', { id: 'pages' });
  const preview = h('div', { id: 'preview' });
  const history = h('div', { id: 'history' });
  const msg = h('div', {});
  const form = h('form', { id: 'publish-page', class: 'row' },
    h('label', {}, 'Page ', h('input', { name: 'page', pattern: '[a-z0-9-]{1,64}', placeholder: 'status', required: true })),
    h('label', {}, 'Title ', h('input', { name: 'title', placeholder: 'Status board', required: true, maxlength: 200 })),
    h('input', { type: 'file', name: 'file', accept: '.html,.htm,text/html', required: true }),
    h('button', { type: 'submit' }, 'Publish'));
  root.append(
    h('p', {}, h('a', { href: `#/m/${enc(slug)}` }, `← ${slug}`)),
    section(`Pages of ${slug}`, list),
    section('Publish a page from a file', form, msg),
    section('Preview', preview),
    section('History', history),
  );

  async function load() {
    try {
      const r = await api('GET', base);
      list.replaceChildren(table(['page', 'title', 'live version', 'latest', 'published', ''],
        r.pages.map((p) => h('tr', { dataset: { page: p.pageSlug } },
          h('td', {}, h('a', { href: p.url, target: '_blank', rel: 'noopener noreferrer' }, p.pageSlug)),
          h('td', {}, p.title || ''),
          h('td', { class: 'live-version' }, p.live === false ? 'offline' : p.version),
          h('td', {}, p.latestVersion),
          h('td', {}, time(p.publishedAt)),
          h('td', {}, h('div', { class: 'row tight' },
            h('button', { type: 'button', class: 'small', onclick: () => show(p) }, 'Preview'),
            h('button', { type: 'button', class: 'small', onclick: () => loadHistory(p.pageSlug) }, 'History'))))),
        'No pages yet.'));
    } catch (e) {
      list.replaceChildren(errorBox(e));
    }
  }

  function show(p) {
    // No allow-same-origin: the page's scripts get an opaque origin inside the console too.
    preview.replaceChildren(
      h('p', {}, h('a', { href: p.url, target: '_blank', rel: 'noopener noreferrer', id: 'open-page' }, `Open ${p.url}`)),
      h('iframe', { src: p.url, sandbox: 'allow-scripts', title: `preview of ${p.pageSlug}`, class: 'preview', id: 'preview-frame' }));
  }

  async function loadHistory(page) {
    try {
      const r = await api('GET', `${base}/${enc(page)}/history`);
      history.replaceChildren(
        h('h3', {}, `${page}: live version ${r.liveVersion ?? 'none'} of ${r.latestVersion}`),
        table(['version', 'title', 'published', 'bytes', 'html sha-256', ''],
          r.versions.map((v) => h('tr', { class: v.live ? 'live' : '', dataset: { version: v.version } },
            h('td', {}, v.version, v.rolledBackFrom ? ` (rollback of ${v.rolledBackFrom})` : ''),
            h('td', {}, v.title), h('td', {}, time(v.publishedAt)), h('td', {}, v.htmlBytes),
            h('td', { class: 'mono small' }, String(v.htmlSha256).slice(0, 16) + '…'),
            h('td', {}, v.live ? h('span', { class: 'pill ok' }, 'live')
              : h('button', { type: 'button', class: 'small rollback', onclick: () => rollback(page, v.version) }, `Roll back to ${v.version}`))))));
    } catch (e) {
      history.replaceChildren(errorBox(e));
    }
  }

  async function rollback(page, version) {
    msg.replaceChildren();
    try {
      const r = await api('POST', `${base}/${enc(page)}/rollback`, { version });
      msg.append(h('p', { class: 'good', id: 'rollback-ok' }, `Rolled ${page} back to version ${version}: now live as version ${r.version}.`));
      await load();
      show({ url: r.url, pageSlug: page });
      await loadHistory(page);
    } catch (e) {
      msg.append(errorBox(e));
    }
  }

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    msg.replaceChildren();
    const f = new FormData(form);
    const page = f.get('page');
    try {
      const file = await readFile(form.elements.file);
      const r = await api('POST', `${base}/${enc(page)}/publish`, { title: f.get('title'), html: file.text, agentZid: ctx.session.zid });
      msg.append(h('p', { class: 'good', id: 'publish-ok' }, `Published ${page} version ${r.version}. `,
        h('a', { href: r.url, target: '_blank', rel: 'noopener noreferrer' }, r.url)));
      form.reset();
      await load();
      show({ url: r.url, pageSlug: page });
      await loadHistory(page);
    } catch (e) {
      msg.append(errorBox(e));
    }
  });
  await load();
}
