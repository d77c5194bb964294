// What the browser tests share: pass/fail counting, a real gateway on a temp data directory,
// HTTPS calls that trust only that gateway's certificate, and Debian's chromium.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

/// `check(name, ok, detail)` prints and counts; `report(label)` prints the tally and exits.
export function checks() {
  let passed = 0;
  let failed = 0;
  return {
    check(name, ok, detail = '') {
      if (ok) {
        passed++;
        console.log(`ok   ${name}`);
      } else {
        failed++;
        console.log(`FAIL ${name} ${detail}`);
      }
    },
    fail() {
      failed++;
    },
    report(label) {
      console.log(`browser ${label}: ${passed} passed, ${failed} failed`);
      process.exit(failed === 0 ? 0 : 1);
    },
  };
}

/// `smgate init` in a new temp directory, `beforeServe(data, owner)` (offline CLI work), then
/// `smgate serve` on free loopback ports. With `mqtt`, also waits for the MQTT server and
/// returns its `host:port` as `broker`.
export async function startGateway(bin, { prefix = 'smgate-browser-', mqtt = false, beforeServe } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const data = path.join(dir, 'data');
  const init = execFileSync(bin, ['--data', data, 'init'], { encoding: 'utf8' });
  const ownerKey = init.match(/^owner key (\S+)/m)[1];
  const ownerZid = init.match(/^owner account (\S+)/m)[1];
  const ca = fs.readFileSync(path.join(data, 'tls/cert.pem'));
  if (beforeServe) beforeServe(data, { ownerKey, ownerZid });

  const env = { ...process.env, SMGATE_HTTP_LISTEN: '127.0.0.1:0', RUST_LOG: 'warn' };
  // The console test's devices publish without a key (the MQTT tests cover keys).
  if (mqtt) Object.assign(env, { SMGATE_MQTT_LISTEN: '127.0.0.1:0', SMGATE_MQTT_ALLOW_ANONYMOUS: 'true' });
  const gw = spawn(bin, ['--data', data, 'serve'], { env, stdio: ['ignore', 'pipe', 'inherit'] });
  const { addr, broker } = await new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error('gateway did not listen within 30 s')), 30000);
    gw.stdout.on('data', (d) => {
      buf += d;
      const web = buf.match(/listening on https:\/\/(\S+)/);
      const broker = buf.match(/mqtt broker on (\S+)/);
      if (web && (!mqtt || broker)) {
        clearTimeout(timer);
        resolve({ addr: web[1], broker: broker && broker[1] });
      }
    });
    gw.on('exit', (code) => reject(new Error(`gateway exited with ${code}`)));
  });
  const origin = `https://${addr}`;
  return {
    dir,
    ownerKey,
    ownerZid,
    origin,
    broker,
    /// An HTTPS call that trusts only this gateway's certificate: `{status, body, headers}`,
    /// with `body` parsed as JSON when it is JSON.
    request(method, urlPath, { body, key, cookie, consoleHeader } = {}) {
      return new Promise((resolve, reject) => {
        const payload = body === undefined ? undefined : JSON.stringify(body);
        const req = https.request(origin + urlPath, {
          method,
          ca,
          headers: {
            ...(key ? { authorization: `Bearer ${key}` } : {}),
            ...(cookie ? { cookie: `smgate_session=${cookie}` } : {}),
            ...(consoleHeader ? { 'x-smgate-console': '1' } : {}),
            ...(payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {}),
          },
        }, (res) => {
          let text = '';
          res.on('data', (d) => (text += d));
          res.on('end', () => {
            let json;
            try { json = JSON.parse(text); } catch { json = text; }
            resolve({ status: res.statusCode, body: json, headers: res.headers });
          });
        });
        req.on('error', reject);
        req.end(payload);
      });
    },
    /// SIGTERM, wait for the exit, remove the temp directory.
    async stop() {
      gw.kill('SIGTERM');
      await new Promise((r) => gw.once('exit', r));
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/// Debian's chromium, headless, with a fresh empty profile and no background networking (this
/// machine's network is closed).
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-background-networking', '--disable-gpu', '--no-first-run',
      '--disable-component-update', '--disable-sync', '--headless'],
  });
}
