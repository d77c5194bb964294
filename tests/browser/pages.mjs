// Browser test of published pages in Debian's chromium (playwright-core, no bundled browser).
//
//   node tests/browser/pages.mjs path/to/smgate [screenshot-dir]
//
// Starts the real gateway on a temp data directory, publishes a plain page and a hostile one,
// gives the browser "operator credentials" on the gateway's origin (a cookie and the owner key
// in localStorage, as a console would keep them), then opens the hostile page. Its script tries
// to read the cookie and the storage, to call the write API with credentials, and to read
// public state; it writes what happened into the DOM. Asserts: the page renders, the reads
// fail, the write fails (and nothing was published), public state is readable. Saves a
// screenshot to target/ui-shots/page-sandbox.png.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checks, launchChromium, startGateway } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const bin = path.resolve(process.argv[2] || path.join(root, 'target/debug/smgate'));
const shots = path.resolve(process.argv[3] || path.join(root, 'target/ui-shots'));

const { check, fail, report } = checks();
const gateway = await startGateway(bin);
const { ownerKey, ownerZid, origin } = gateway;
const api = (method, urlPath, body, key = ownerKey) => gateway.request(method, urlPath, { body, key });

// The hostile page: everything it learns goes into #result as JSON.
const HOSTILE = `<!doctype html>
<html><head><meta charset="utf-8"><title>hostile</title>
<style>body{font:15px system-ui,sans-serif;margin:2rem} pre{background:#f3f3f3;padding:1rem;white-space:pre-wrap}</style>
</head><body>
<h1 id="title">A page that tries to steal the operator's credentials</h1>
<pre id="result">running…</pre>
<script>
(async () => {
  const out = {};
  const attempt = async (name, fn) => {
    try { out[name] = { ok: true, value: await fn() }; }
    catch (e) { out[name] = { ok: false, error: String(e && e.name || e) }; }
  };
  await attempt('origin', () => self.origin);
  await attempt('cookie', () => document.cookie);
  await attempt('localStorage', () => localStorage.getItem('smgate.key'));
  await attempt('sessionStorage', () => sessionStorage.length);
  await attempt('indexedDB', () => new Promise((res, rej) => {
    const r = indexedDB.open('steal'); r.onsuccess = () => res('opened'); r.onerror = () => rej(r.error);
  }));
  const steal = { title: 'pwned', html: '<p>pwned</p>', agentZid: 'ZEQ-attacker' };
  await attempt('writeJson', async () => {
    const r = await fetch('/api/state-machines/demo/pages/pwned/publish', {
      method: 'POST', credentials: 'include',
      headers: { 'content-type': 'application/json' }, body: JSON.stringify(steal) });
    return r.status;
  });
  await attempt('writeSimple', async () => {
    const r = await fetch('/api/state-machines/demo/pages/pwned2/publish', {
      method: 'POST', credentials: 'include', headers: { 'content-type': 'text/plain' },
      body: JSON.stringify(steal) });
    return r.status;
  });
  await attempt('readConsole', async () => (await fetch('/ui/', { credentials: 'include' })).status);
  await attempt('readApi', async () => (await fetch('/api/state-machines/demo/pages', { credentials: 'include' })).status);
  await attempt('state', async () => {
    const r = await fetch('/s/demo/state.json');
    return { status: r.status, body: await r.json() };
  });
  document.getElementById('result').textContent = JSON.stringify(out, null, 2);
  document.body.dataset.done = '1';
})();
</script></body></html>`;

let browser;
try {
  let r = await api('POST', '/api/chain/state-machines', { slug: 'demo', is_public: false, display_name: 'Demo machine' });
  check('create machine', r.status === 201, JSON.stringify(r.body));
  r = await api('POST', '/api/state-machines/demo/pages/hello/publish',
    { title: 'Hello', html: '<!doctype html><title>Hello</title><h1>Hello from a published page</h1>', agentZid: ownerZid });
  check('publish hello', r.status === 201, JSON.stringify(r.body));
  r = await api('POST', '/api/state-machines/demo/pages/evil/publish', { title: 'Hostile', html: HOSTILE, agentZid: ownerZid });
  check('publish hostile page', r.status === 201, JSON.stringify(r.body));

  browser = await launchChromium();
  // The gateway's certificate is self-signed for 127.0.0.1; trust is checked by the API calls above.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 900, height: 900 } });
  await context.addCookies([
    { name: 'operator_session', value: 'cookie-secret', url: origin, secure: true, sameSite: 'None', httpOnly: false },
    { name: 'operator_lax', value: 'lax-secret', url: origin, secure: true, sameSite: 'Lax', httpOnly: false },
  ]);
  const page = await context.newPage();

  // The operator's credentials on the gateway's origin (where the console lives).
  await page.goto(`${origin}/ui/`);
  await page.evaluate((key) => localStorage.setItem('smgate.key', key), ownerKey);
  const seen = await page.evaluate(() => ({ cookie: document.cookie, key: localStorage.getItem('smgate.key') }));
  check('console origin holds the credentials', seen.cookie.includes('cookie-secret') && seen.key === ownerKey, JSON.stringify(seen));

  // A plain published page renders.
  let res = await page.goto(`${origin}/s/demo/p/hello/`);
  check('plain page renders', res.status() === 200 && (await page.textContent('h1')) === 'Hello from a published page');
  check('page is sandboxed by CSP', (res.headers()['content-security-policy'] || '').startsWith('sandbox allow-scripts'));

  // The hostile page.
  res = await page.goto(`${origin}/s/demo/p/evil/`);
  check('hostile page renders', res.status() === 200 && (await page.textContent('#title')).includes('steal'));
  await page.waitForSelector('body[data-done="1"]', { timeout: 15000 });
  const out = JSON.parse(await page.textContent('#result'));
  console.log(JSON.stringify(out));
  check('runs in an opaque origin', out.origin.ok && out.origin.value === 'null', JSON.stringify(out.origin));
  check('cannot read cookies', !out.cookie.ok || !String(out.cookie.value).includes('secret'), JSON.stringify(out.cookie));
  check('cannot read localStorage', !out.localStorage.ok || out.localStorage.value !== ownerKey, JSON.stringify(out.localStorage));
  check('cannot use sessionStorage', !out.sessionStorage.ok, JSON.stringify(out.sessionStorage));
  check('cannot open indexedDB', !out.indexedDB.ok, JSON.stringify(out.indexedDB));
  check('cannot call the write API (JSON)', !out.writeJson.ok, JSON.stringify(out.writeJson));
  check('cannot read a write API answer (simple POST)', !out.writeSimple.ok, JSON.stringify(out.writeSimple));
  check('cannot read the console', !out.readConsole.ok, JSON.stringify(out.readConsole));
  check('cannot read the API', !out.readApi.ok, JSON.stringify(out.readApi));
  check('can read public state', out.state.ok && out.state.value.status === 200 && Array.isArray(out.state.value.body.instances),
    JSON.stringify(out.state));
  for (const p of ['pwned', 'pwned2']) {
    const h = await api('GET', `/api/state-machines/demo/pages/${p}/history`, undefined, null);
    check(`nothing was published as ${p}`, h.status === 404, JSON.stringify(h.body));
  }
  const hist = await api('GET', '/api/state-machines/demo/pages/evil/history', undefined, null);
  check('the hostile page was not republished', hist.body.latestVersion === 1, JSON.stringify(hist.body));

  fs.mkdirSync(shots, { recursive: true });
  const shot = path.join(shots, 'page-sandbox.png');
  await page.screenshot({ path: shot, fullPage: true });
  check('screenshot saved', fs.statSync(shot).size > 1000, shot);
  console.log(`screenshot: ${shot}`);
} catch (e) {
  console.error(e);
  fail();
} finally {
  if (browser) await browser.close();
  await gateway.stop();
}
report('pages');
