// Browser test of the operator console in Debian's chromium (playwright-core, no bundled browser).
//
//   node tests/browser/console.mjs path/to/smgate [screenshot-dir]
//
// Starts the real gateway (temp data directory, embedded MQTT broker on a free loopback port)
// and drives the console like an operator: signs in with the owner key (and checks the
// browser holds only an HttpOnly SameSite=Strict cookie), creates a machine (its key is shown
// once, then never again), uploads firmware-config/machines/heartbeat.json, publishes
// heartbeats with mosquitto_pub and watches the instance appear and change state live
// (online → stale → online) without a reload, reads the timeline, the log and the dead letters,
// publishes a page from a file (whose script tries to use the operator's session and must
// fail), opens it, rolls it back, visits agents and sync, and signs out (the old cookie then
// gets 401). Screenshots: target/ui-shots/console-*.png.

import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { checks, launchChromium, startGateway } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../..');
const bin = path.resolve(process.argv[2] || path.join(root, 'target/debug/smgate'));
const shots = path.resolve(process.argv[3] || path.join(root, 'target/ui-shots'));

const { check, fail, report } = checks();
const gateway = await startGateway(bin, {
  prefix: 'smgate-console-',
  mqtt: true,
  // ZEQ for one agent run (offline, before serve), so the agents screen has a lineage to plot.
  beforeServe: (data, { ownerZid }) =>
    execFileSync(bin, ['--data', data, 'account', 'credit', ownerZid, '1000'], { encoding: 'utf8' }),
});
const { ownerKey, ownerZid, origin, broker, dir } = gateway;
const [mqttHost, mqttPort] = [broker.slice(0, broker.lastIndexOf(':')), broker.slice(broker.lastIndexOf(':') + 1)];
const api = (method, urlPath, opts) => gateway.request(method, urlPath, opts);

function mqttPublish(topic, message) {
  execFileSync('mosquitto_pub', ['-h', mqttHost, '-p', mqttPort, '-q', '1', '-i', `console-test-${process.pid}`,
    '-t', topic, '-m', message], { stdio: 'inherit', timeout: 15000 });
}

// The first page version probes the operator's session from inside its sandbox.
const PAGE_V1 = `<!doctype html>
<html><head><meta charset="utf-8"><title>status v1</title>
<style>body{font:16px system-ui,sans-serif;margin:1.5rem} pre{background:#f3f3f3;padding:.6rem;white-space:pre-wrap}</style></head>
<body><h1 id="title">Version one</h1><p>Published from a file by the console test.</p><pre id="probe">probing…</pre>
<script>
(async () => {
  const out = {};
  const attempt = async (name, fn) => {
    try { out[name] = { ok: true, value: await fn() }; } catch (e) { out[name] = { ok: false, error: String(e && e.name || e) }; }
  };
  await attempt('origin', () => self.origin);
  await attempt('cookie', () => document.cookie);
  await attempt('write', async () => (await fetch('/api/chain/state-machines', { method: 'POST', credentials: 'include',
    headers: { 'content-type': 'application/json', 'x-smgate-console': '1' }, body: JSON.stringify({ slug: 'pwned' }) })).status);
  await attempt('simpleWrite', async () => (await fetch('/api/chain/state-machines', { method: 'POST', credentials: 'include',
    headers: { 'content-type': 'text/plain' }, body: JSON.stringify({ slug: 'pwned-simple' }) })).status);
  await attempt('session', async () => (await fetch('/ui/api/session', { credentials: 'include' })).status);
  document.getElementById('probe').textContent = JSON.stringify(out, null, 1);
  document.body.dataset.done = '1';
})();
</script></body></html>`;
const PAGE_V2 = `<!doctype html><html><head><meta charset="utf-8"><title>status v2</title>
<style>body{font:16px system-ui,sans-serif;margin:1.5rem}</style></head>
<body><h1 id="title">Version two</h1><p>The second version, rolled back by the test.</p></body></html>`;

let browser;
try {
  fs.mkdirSync(shots, { recursive: true });
  const pageV1 = path.join(dir, 'status-v1.html');
  const pageV2 = path.join(dir, 'status-v2.html');
  fs.writeFileSync(pageV1, PAGE_V1);
  fs.writeFileSync(pageV2, PAGE_V2);

  browser = await launchChromium();
  // A fresh, empty profile. The certificate is self-signed for 127.0.0.1; trust is checked
  // by the API calls (which pin it).
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1100, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  const shot = async (name, p = page) => {
    const file = path.join(shots, `console-${name}.png`);
    await p.screenshot({ path: file, fullPage: true });
    check(`screenshot ${name}`, fs.statSync(file).size > 5000, file);
  };

  // --- sign in ---------------------------------------------------------------------------
  await page.goto(`${origin}/ui/`);
  await page.waitForSelector('#sign-in');
  await page.fill('#key', 'zeq_ak_wrong');
  await page.click('#sign-in button[type=submit]');
  await page.waitForSelector('#sign-in .error');
  check('a wrong key is refused', (await page.textContent('#sign-in .error')).includes('unauthorized'));
  await shot('signin');
  await page.fill('#key', ownerKey);
  await page.click('#sign-in button[type=submit]');
  await page.waitForSelector('#create-machine');
  const cookies = await context.cookies(origin);
  const session = cookies.find((c) => c.name === 'smgate_session');
  check('session cookie is HttpOnly, Secure, SameSite=Strict',
    session && session.httpOnly && session.secure && session.sameSite === 'Strict', JSON.stringify(cookies));
  const stored = await page.evaluate(() => ({
    cookie: document.cookie, local: JSON.stringify(localStorage), session: JSON.stringify(sessionStorage),
  }));
  check('the browser keeps no key and scripts see no session', !JSON.stringify(stored).includes('zeq_ak_')
    && !stored.cookie.includes('smgate_session') && stored.local === '{}' && stored.session === '{}', JSON.stringify(stored));

  // --- create a machine: its key is shown once --------------------------------------------
  await page.fill('#create-machine input[name=slug]', 'demo');
  await page.fill('#create-machine input[name=display_name]', 'Demo sensors');
  await page.click('#create-machine button[type=submit]');
  await page.waitForSelector('#machine-key');
  const machineKey = (await page.textContent('#machine-key')).trim();
  check('machine key shown once with a warning', machineKey.startsWith('zsm_')
    && (await page.textContent('.once')).includes('will not be shown again'));
  await page.waitForSelector('a.machine-link:text("demo")');
  await shot('machine-created');
  await page.click('#key-done');
  check('the key is gone after "Done"', !(await page.content()).includes(machineKey));

  // --- the machine: upload the definition, MQTT heartbeats, live state -------------------
  await page.click('a.machine-link:text("demo")');
  await page.waitForSelector('#upload-version');
  check('the key is not on the machine screen', !(await page.content()).includes(machineKey));
  await page.setInputFiles('#upload-version input[type=file]', path.join(root, 'firmware-config/machines/heartbeat.json'));
  await page.click('#upload-version button[type=submit]');
  await page.waitForSelector('#upload-ok');
  await page.waitForSelector('#current-version:text("#1")');
  check('definition uploaded as version 1', (await page.textContent('#upload-ok')).includes('version 1'));
  await page.evaluate(() => { window.__sameDocument = 'still here'; });

  mqttPublish('smgate/demo/sensor-1/heartbeat', JSON.stringify({ ts: 1 }));
  const stateCell = 'tr[data-instance="sensor-1"] td.state';
  await page.waitForSelector(`${stateCell}:text("online")`, { timeout: 20000 });
  check('an MQTT-created instance appears live as online', true);
  mqttPublish('smgate/demo/sensor-1/heartbeat', 'not json');
  await page.waitForSelector('#dead-letters td:text("smgate/demo/sensor-1/heartbeat")', { timeout: 20000 });
  check('a malformed heartbeat shows up as a dead letter', true);
  await page.waitForSelector('#log-valid.good', { timeout: 10000 });
  check('log validates', (await page.textContent('#log-valid')).startsWith('valid'), await page.textContent('#log'));
  check('log shows a checkpoint', (await page.textContent('#checkpoint')).includes('\u2014 '), await page.textContent('#checkpoint'));
  await shot('machine');

  // online → stale after 30 s without heartbeats (a durable timer), then back online.
  await page.waitForSelector(`${stateCell}:text("stale")`, { timeout: 60000 });
  check('the state changes to stale live', true);
  await shot('live-stale');
  mqttPublish('smgate/demo/sensor-1/heartbeat', JSON.stringify({ ts: 2 }));
  await page.waitForSelector(`${stateCell}:text("online")`, { timeout: 20000 });
  check('a heartbeat brings it back online live', true);
  check('no reload happened', (await page.evaluate(() => window.__sameDocument)) === 'still here');
  await page.waitForTimeout(1200); // let the rate plots take the last events
  await shot('live-online');

  // --- the instance's timeline -------------------------------------------------------------
  await page.click('tr[data-instance="sensor-1"] a');
  await page.waitForSelector('#timeline tbody tr');
  await page.waitForFunction(() => document.querySelectorAll('#timeline tbody tr.moved').length >= 2, null, { timeout: 10000 });
  const timeline = await page.textContent('#timeline');
  check('timeline shows online → stale → online', timeline.includes('stale') && timeline.includes('HEARTBEAT'), timeline);
  await shot('timeline');

  // --- pages: publish from a file, preview, open, roll back --------------------------------
  await page.goto(`${origin}/ui/#/m/demo/pages`);
  await page.waitForSelector('#publish-page');
  const publish = async (file, title) => {
    await page.fill('#publish-page input[name=page]', 'status');
    await page.fill('#publish-page input[name=title]', title);
    await page.setInputFiles('#publish-page input[type=file]', file);
    await page.click('#publish-page button[type=submit]');
    await page.waitForSelector(`#publish-ok:text("${title === 'Status one' ? 'version 1' : 'version 2'}")`);
  };
  await publish(pageV1, 'Status one');
  const frame = page.frameLocator('#preview-frame');
  await frame.locator('body[data-done="1"]').waitFor({ timeout: 15000 });
  const probe = JSON.parse(await frame.locator('#probe').textContent());
  console.log(JSON.stringify(probe));
  check('preview runs in an opaque origin', probe.origin.ok && probe.origin.value === 'null', JSON.stringify(probe.origin));
  check('the page cannot read the cookie', !probe.cookie.ok || !String(probe.cookie.value).includes('zss_'));
  check('the page cannot write with the session', !probe.write.ok, JSON.stringify(probe.write));
  check('the page cannot read a simple write answer', !probe.simpleWrite.ok, JSON.stringify(probe.simpleWrite));
  check('the page cannot read the session', !probe.session.ok, JSON.stringify(probe.session));
  await shot('pages-preview');
  await publish(pageV2, 'Status two');
  await page.waitForSelector('#history tr[data-version="2"].live');
  await shot('pages-history');

  const tab = await context.newPage();
  await tab.goto(`${origin}/s/demo/p/status/`);
  check('the published page opens (version two)', (await tab.textContent('#title')) === 'Version two');
  await shot('page-open', tab);

  await page.click('#history tr[data-version="1"] button.rollback');
  await page.waitForSelector('#rollback-ok');
  await page.waitForSelector('#history tr[data-version="3"].live');
  await tab.reload();
  check('after rollback the page is version one again', (await tab.textContent('#title')) === 'Version one');
  await shot('pages-rollback');
  await tab.close();

  const machines = await api('GET', '/api/chain/state-machines', { key: ownerKey });
  check('the page made no machine with the session', machines.body.machines.every((m) => !m.slug.startsWith('pwned')),
    JSON.stringify(machines.body.machines.map((m) => m.slug)));

  // --- agents, sync, gateway ---------------------------------------------------------------
  const spawned = await api('POST', '/api/zeq/agent/spawn', {
    key: ownerKey, body: { problem: 'optimal radiation shielding for 180-day Mars transit', population: 6, generations: 6, precision: 0.001 },
  });
  check('an agent run starts', spawned.status === 200, JSON.stringify(spawned.body));
  for (let i = 0; i < 60; i++) {
    const s = await api('GET', `/api/zeq/agent/status/${spawned.body.agent_id}`, { key: ownerKey });
    if (s.body.status !== 'running' && s.body.status !== 'live') break;
    await new Promise((r) => setTimeout(r, 500));
  }
  await page.goto(`${origin}/ui/#/agents`);
  await page.waitForSelector('#agents table');
  await page.waitForSelector('#agent-plots .plot canvas');
  check('agents list the run and plot its fitness', (await page.textContent('#agents')).includes(spawned.body.agent_id));
  await shot('agents');
  await page.goto(`${origin}/ui/#/sync`);
  await page.waitForSelector('#sync table, #sync p');
  check('sync lists the machine', (await page.textContent('#sync')).includes('demo'));
  await page.waitForTimeout(5500); // a second sample for the backlog plot
  await shot('sync');
  await page.goto(`${origin}/ui/#/gateway`);
  await page.waitForSelector('#gateway dd');
  await shot('gateway');

  // --- a phone-sized screen ----------------------------------------------------------------
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${origin}/ui/#/m/demo`);
  await page.waitForSelector(`${stateCell}:text("online")`);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check('readable on a phone (no page-wide horizontal scroll)', overflow <= 1, `overflow ${overflow}px`);
  await shot('phone');
  await page.setViewportSize({ width: 1100, height: 900 });

  // The key never shows again anywhere we went.
  check('the machine key never reappears', !(await page.content()).includes(machineKey));

  // --- sign out ----------------------------------------------------------------------------
  const before = await api('GET', '/api/chain/state-machines', { cookie: session.value });
  check('the cookie works before sign-out', before.status === 200 && before.body.count >= 1, JSON.stringify(before.body));
  await page.goto(`${origin}/ui/#/`);
  await page.click('#sign-out');
  await page.waitForSelector('#sign-in');
  const after = await api('GET', '/api/chain/state-machines', { cookie: session.value });
  check('sign-out ends the session on the gateway (old cookie: 401)', after.status === 401, JSON.stringify(after.body));
  const left = (await context.cookies(origin)).find((c) => c.name === 'smgate_session');
  check('the browser dropped the cookie', !left, JSON.stringify(left));
  await page.reload();
  await page.waitForSelector('#sign-in');
  check('a reload after sign-out shows the sign-in screen', true);
  check('no script errors', errors.length === 0, JSON.stringify(errors));
} catch (e) {
  console.error(e);
  fail();
} finally {
  if (browser) await browser.close();
  await gateway.stop();
}
report('console');
