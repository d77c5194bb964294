// The console shell: sign-in, navigation and a hash router. Each screen is a function
// `(root, params, ctx) => cleanup?` in its own module; the cleanup closes its live streams.
//
// The account key is typed into the sign-in form, sent once to /ui/api/session and
// dropped: the browser keeps only the HttpOnly session cookie, which scripts cannot read.
import { api, h, errorBox, whenSignedOut } from './lib.js';
import { machinesScreen, machineScreen, instanceScreen } from './machines.js';
import { pagesScreen } from './pages.js';
import { agentsScreen, syncScreen, gatewayScreen } from './ops.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
const ctx = { session: null };
let cleanup = null;

const routes = [
  [/^#?\/?$/, machinesScreen],
  [/^#\/m\/([a-z0-9-]+)$/, machineScreen],
  [/^#\/m\/([a-z0-9-]+)\/i\/([^/]+)$/, instanceScreen],
  [/^#\/m\/([a-z0-9-]+)\/pages$/, pagesScreen],
  [/^#\/agents$/, agentsScreen],
  [/^#\/sync$/, syncScreen],
  [/^#\/gateway$/, gatewayScreen],
];

function stop() {
  if (typeof cleanup === 'function') {
    try { cleanup(); } catch (e) { console.warn(e); }
  }
  cleanup = null;
}

async function route() {
  stop();
  main.replaceChildren();
  if (!ctx.session) return signInScreen();
  const hash = location.hash || '#/';
  for (const [re, screen] of routes) {
    const m = hash.match(re);
    if (m) {
      document.body.dataset.screen = screen.name;
      try {
        cleanup = await screen(main, m.slice(1).map(decodeURIComponent), ctx);
      } catch (e) {
        main.append(errorBox(e));
      }
      return;
    }
  }
  main.append(h('p', { class: 'error' }, 'No such screen. ', h('a', { href: '#/' }, 'Machines')));
}

function showSignedIn() {
  nav.hidden = false;
  who.replaceChildren(
    h('span', { class: 'mono' }, ctx.session.zid),
    ' ',
    h('button', { type: 'button', class: 'link', id: 'sign-out', onclick: signOut }, 'Sign out'),
  );
}

function showSignedOut() {
  ctx.session = null;
  nav.hidden = true;
  who.replaceChildren();
}

async function signOut() {
  try { await api('DELETE', '/ui/api/session'); } catch { /* already gone */ }
  showSignedOut();
  route();
}

function signInScreen() {
  document.body.dataset.screen = 'signIn';
  const input = h('input', {
    id: 'key', name: 'key', type: 'password', autocomplete: 'off', spellcheck: 'false',
    placeholder: 'zeq_ak_…', required: true,
  });
  const msg = h('div', {});
  const form = h('form', { id: 'sign-in', class: 'card narrow' },
    h('h2', {}, 'Sign in'),
    h('p', {}, 'Paste an account key (zeq_ak_…). The first one is printed by ',
      h('code', {}, 'smgate init'), ' and kept in ', h('code', {}, 'data/initial-owner.key'), '.'),
    h('label', { for: 'key' }, 'Account key'), input,
    h('button', { type: 'submit' }, 'Sign in'),
    h('p', { class: 'muted small' },
      'The key is sent once; the browser keeps only a session cookie that scripts cannot read. ',
      'Signing out ends the session on the gateway.'),
    msg);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const key = input.value;
    input.value = '';
    msg.replaceChildren();
    try {
      ctx.session = await api('POST', '/ui/api/session', { key });
      showSignedIn();
      route();
    } catch (e) {
      msg.append(errorBox(e));
    }
  });
  main.append(form);
  input.focus();
}

whenSignedOut(() => {
  if (ctx.session) {
    showSignedOut();
    route();
  }
});
window.addEventListener('hashchange', route);

try {
  ctx.session = await api('GET', '/ui/api/session');
  showSignedIn();
} catch {
  showSignedOut();
}
route();
