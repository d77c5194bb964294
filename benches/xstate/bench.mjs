// The xstate 5 side of benches/chart.rs: runs one of our JSON definitions with xstate and
// reports events/s as one JSON line on stdout.
//
//   node bench.mjs DEFINITION.json EVENTS.jsonl STEPS [TRACE]
//
// EVENTS.jsonl uses the `smgate chart simulate` input format (NAME, {"type": NAME, ...data},
// {"type": "$advance", "ms": N}) and is cycled until STEPS lines have been processed.
// `$advance` moves xstate's SimulatedClock timer by timer (see `advance`), so `after` timers
// fire exactly as on our engine's virtual clock. The first TRACE steps' {value, context} are included for the equivalence
// check, together with the final {value, context}.
//
// Our guards and assign values are Rhai. The bench definitions keep to the subset that is also
// JavaScript (member access, arithmetic, comparisons, `??`, map literals `#{…}` → `{…}`), so the
// conversion below is a rewrite of map literals plus a check that nothing else is used.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { performance } from 'node:perf_hooks';
import { assign, createActor, createMachine, raise, SimulatedClock } from 'xstate';

const [defPath, eventsPath, stepsArg, traceArg] = process.argv.slice(2);
if (!defPath || !eventsPath) {
  console.error('usage: node bench.mjs DEFINITION.json EVENTS.jsonl STEPS [TRACE]');
  process.exit(2);
}
const steps = Number(stepsArg ?? 100000);
const traceLen = Number(traceArg ?? 0);

/** Rhai expression (bench subset) → `(context, event) => value`; `event` is {type, data}. */
function compileExpr(src, where) {
  if (/\b(let|fn|loop|while|for|if|switch|in_state|this)\b|=>|[;`]/.test(src)) {
    throw new Error(`${where}: expression ${JSON.stringify(src)} is outside the Rhai/JS subset`);
  }
  const js = src.replace(/#\{/g, '{');
  // eslint-disable-next-line no-new-func
  return new Function('context', 'event', `"use strict"; return (${js});`);
}

/** XState event {type, ...data} → the `event` our expressions see: {type, data}. */
function ourEvent(event) {
  const { type, ...data } = event;
  return { type, data };
}

function valueFn(v, where) {
  if (typeof v === 'string') {
    const f = compileExpr(v, where);
    return (context, event) => f(context, ourEvent(event));
  }
  return () => structuredClone(v);
}

function convertAction(a, where) {
  const { type, params = {} } = typeof a === 'string' ? { type: a } : a;
  switch (type) {
    case 'assign': {
      const fields = Object.entries(params).map(([k, v]) => [k, valueFn(v, `${where}.params.${k}`)]);
      return assign(({ context, event }) => {
        const out = {};
        for (const [k, f] of fields) out[k] = f(context, event);
        return out;
      });
    }
    case 'raise':
      return raise({ type: params.event });
    case 'log':
      return () => {};
    default:
      throw new Error(`${where}: action ${type} is not converted for the bench`);
  }
}

function convertActions(a, where) {
  if (a === undefined) return undefined;
  const list = Array.isArray(a) ? a : [a];
  return list.map((x, i) => convertAction(x, `${where}[${i}]`));
}

function convertTransition(t, where) {
  if (typeof t === 'string' || t === null) return t;
  if (Array.isArray(t)) return t.map((x, i) => convertTransition(x, `${where}[${i}]`));
  const out = { ...t };
  if (typeof t.guard === 'string') {
    const f = compileExpr(t.guard, `${where}.guard`);
    out.guard = ({ context, event }) => f(context, ourEvent(event)) === true;
  }
  if (t.actions !== undefined) out.actions = convertActions(t.actions, `${where}.actions`);
  return out;
}

function convertState(s, where) {
  const out = { ...s };
  delete out.description;
  for (const key of ['on', 'after']) {
    if (s[key]) {
      out[key] = Object.fromEntries(
        Object.entries(s[key]).map(([k, t]) => [k, convertTransition(t, `${where}.${key}.${k}`)]),
      );
    }
  }
  if (s.always !== undefined) out.always = convertTransition(s.always, `${where}.always`);
  for (const key of ['entry', 'exit']) {
    if (s[key] !== undefined) out[key] = convertActions(s[key], `${where}.${key}`);
  }
  if (s.states) {
    out.states = Object.fromEntries(
      Object.entries(s.states).map(([k, c]) => [k, convertState(c, `${where}.states.${k}`)]),
    );
  }
  return out;
}

function parseLine(line) {
  if (line.startsWith('{')) {
    const ev = JSON.parse(line);
    if (ev.type === '$advance') return { advance: ev.ms };
    return { event: ev };
  }
  if (line.startsWith('"')) return { event: { type: JSON.parse(line) } };
  return { event: { type: line } };
}

const definition = JSON.parse(readFileSync(defPath, 'utf8'));
const machine = createMachine(convertState(definition, '$'));
const inputs = readFileSync(eventsPath, 'utf8')
  .split('\n')
  .map((l) => l.trim())
  .filter((l) => l.length > 0)
  .map(parseLine);

/**
 * Moves the clock forward by `ms` the way our virtual clock does: a timer that comes due during
 * the advance is scheduled from its due time, not from the end of the advance
 * (`SimulatedClock.increment` would start it at the end).
 */
function advance(clock, ms) {
  const target = clock.now() + ms;
  for (;;) {
    let next = Infinity;
    for (const t of clock.timeouts.values()) next = Math.min(next, t.start + t.timeout);
    if (next > target) break;
    clock.set(Math.max(next, clock.now()));
  }
  clock.set(target);
}

/**
 * What a host does per line: the send (or clock advance), then `getSnapshot()`; with
 * `persist`, also the persisted snapshot as JSON (what it would store).
 */
function run(n, trace, persist = false) {
  const clock = new SimulatedClock();
  const actor = createActor(machine, { clock });
  let failure;
  actor.subscribe({ error: (e) => { failure = e; } });
  actor.start();
  const seen = [];
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    const input = inputs[i % inputs.length];
    if (input.advance !== undefined) advance(clock, input.advance);
    else actor.send(input.event);
    const s = actor.getSnapshot();
    if (persist) sink ^= JSON.stringify(actor.getPersistedSnapshot()).length;
    if (i < trace) seen.push({ value: s.value, context: s.context });
  }
  const ms = performance.now() - t0;
  const s = actor.getSnapshot();
  if (failure || s.status === 'error') throw failure ?? s.error;
  actor.stop();
  return { ms, trace: seen, final: { value: s.value, context: s.context } };
}

let sink = 0; // keeps the persisted JSON observable
run(Math.min(steps, 20000), 0); // warm up the JIT
const result = run(steps, traceLen);
run(Math.min(steps, 20000), 0, true);
const persisted = run(steps, 0, true);
const require = createRequire(import.meta.url);
console.log(
  JSON.stringify({
    engine: 'xstate',
    version: require('xstate/package.json').version,
    node: process.version,
    steps,
    ms: result.ms,
    events_per_s: steps / (result.ms / 1000),
    persist_events_per_s: steps / (persisted.ms / 1000),
    sink,
    final: result.final,
    trace: result.trace,
  }),
);
