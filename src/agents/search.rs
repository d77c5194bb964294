//! The deterministic evolutionary search. Pure: no clock, no I/O, no global randomness.
//!
//! # Seeding
//! The generator is xoshiro256** whose 256-bit state is SHA-256(problem ‖ agent id) (the
//! problem's UTF-8 bytes, then the agent id as its 36-character hyphenated UUID string), read
//! as four little-endian u64 words. Its state is stored with the run after every tick, so a
//! run resumed after a restart continues the same stream: the same problem and agent id give
//! the same lineage on any gateway: all arithmetic is IEEE-754 without the platform libm
//! (see `detmath`).
//!
//! # One tick = one generation
//! Generation 0 draws `population` genotypes: a head operator weighted towards the problem
//! (1 + 3 per keyword of the operator found in the statement + 2 per input the statement
//! pins), then 0–2 dimensionless tail operators, then every free input from its range. Each
//! later generation keeps the best genotype (elitism) and fills the rest with children of
//! two size-2 tournaments: crossover (p = 0.7: the head of the first parent, each tail slot
//! and each gene from either parent) then one mutation (perturb a gene, swap the head, add,
//! remove or swap a tail operator).
//!
//! # Fitness (lower is better)
//! - With `target=`: the relative error `|value − target| / |target|` (absolute when the
//!   target is 0).
//! - Without a target, the default objective is robustness: the largest relative change of
//!   the value when any one input (given or evolved) is raised by 1 %. The search then settles
//!   on operating points where the answer does not hinge on any single input.
//!
//! A value that is not finite (e.g. a radius inside the photon sphere) scores
//! [`FITNESS_CAP`], which is also the ceiling of every score.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::catalog::{Operator, CATALOG, KO42};
use super::detmath as m;
use super::problem::Problem;

/// Worst possible fitness; also given to non-finite results.
pub const FITNESS_CAP: f64 = 1e9;
/// Most operators after KO42 (so ≤ 4 with it).
pub const MAX_CHAIN: usize = 3;

/// xoshiro256** (Blackman & Vigna), enough for search decisions; not for secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng(pub [u64; 4]);

impl Rng {
    /// The generator of a run: SHA-256(problem ‖ agent id).
    pub fn seeded(problem: &str, agent_id: &str) -> Rng {
        let mut h = Sha256::new();
        h.update(problem.as_bytes());
        h.update(agent_id.as_bytes());
        let d: [u8; 32] = h.finalize().into();
        let mut s = [0u64; 4];
        for (i, w) in s.iter_mut().enumerate() {
            *w = u64::from_le_bytes(d[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        }
        if s == [0; 4] {
            s[0] = 1; // The all-zero state is a fixed point.
        }
        Rng(s)
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// KO42 followed by `ops` (catalog indices), with the genes of their free inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Genotype {
    /// Head first, then the dimensionless tail. Never contains KO42 (it is implicit, first).
    pub ops: Vec<u8>,
    pub genes: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub genotype: Genotype,
    pub fitness: f64,
}

/// What the kernel computes for a genotype: the ZeqState.
#[derive(Debug, Clone)]
pub struct ZeqState {
    pub value: f64,
    pub unit: &'static str,
    /// (operator, its output, its unit, its inputs).
    pub terms: Vec<(&'static Operator, f64, BTreeMap<&'static str, f64>)>,
}

impl ZeqState {
    pub fn to_json(&self) -> Value {
        let terms: Vec<Value> = self
            .terms
            .iter()
            .map(|(op, v, inputs)| {
                json!({"operator": op.code, "equation": op.equation, "value": finite(*v), "unit": op.unit, "inputs": inputs})
            })
            .collect();
        json!({"value": finite(self.value), "unit": self.unit, "terms": terms})
    }
}

/// JSON has no NaN or infinity: those show as null.
fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

impl Genotype {
    pub fn operators(&self) -> Vec<&'static str> {
        std::iter::once(CATALOG[KO42].code)
            .chain(self.ops.iter().map(|&i| CATALOG[i as usize].code))
            .collect()
    }

    fn input_value(&self, problem: &Problem, name: &str) -> f64 {
        problem
            .params
            .get(name)
            .or_else(|| self.genes.get(name))
            .copied()
            .unwrap_or(f64::NAN)
    }

    /// Evaluates the chain: KO42 · head · Π tail.
    pub fn evaluate(&self, problem: &Problem) -> ZeqState {
        let ko42 = &CATALOG[KO42];
        let t = problem.params.get("t").copied().unwrap_or(0.0);
        let k = ko42.eval(&[t]);
        let mut terms = vec![(ko42, k, BTreeMap::from([("t", t)]))];
        let mut value = k;
        for &i in &self.ops {
            let op = &CATALOG[i as usize];
            let args: Vec<f64> = op
                .inputs
                .iter()
                .map(|inp| self.input_value(problem, inp.name))
                .collect();
            let v = op.eval(&args);
            value *= v;
            terms.push((op, v, op.inputs.iter().map(|i| i.name).zip(args).collect()));
        }
        let unit = self
            .ops
            .first()
            .map(|&i| CATALOG[i as usize].unit)
            .unwrap_or("1");
        ZeqState { value, unit, terms }
    }

    /// Fitness per the module doc.
    pub fn fitness(&self, problem: &Problem) -> f64 {
        let v = self.evaluate(problem).value;
        if !v.is_finite() {
            return FITNESS_CAP;
        }
        let score = match problem.target {
            Some(0.0) => v.abs(),
            Some(t) => (v - t).abs() / t.abs(),
            None => {
                if v == 0.0 {
                    return FITNESS_CAP;
                }
                let mut worst = 0.0f64;
                for name in self.input_names() {
                    let mut bumped = self.clone();
                    let mut p = problem.clone();
                    match p.params.get_mut(name) {
                        Some(x) => *x *= 1.01,
                        None => {
                            if let Some(g) = bumped.genes.get_mut(name) {
                                *g *= 1.01;
                            }
                        }
                    }
                    let w = bumped.evaluate(&p).value;
                    worst = worst.max(if w.is_finite() {
                        (w - v).abs() / v.abs()
                    } else {
                        FITNESS_CAP
                    });
                }
                worst
            }
        };
        if score.is_finite() {
            score.min(FITNESS_CAP)
        } else {
            FITNESS_CAP
        }
    }

    /// Input names of the chain's operators (not KO42's `t`), once each, in order.
    fn input_names(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for &i in &self.ops {
            for inp in CATALOG[i as usize].inputs {
                if !out.contains(&inp.name) {
                    out.push(inp.name);
                }
            }
        }
        out
    }

    /// Draws missing genes and drops unused ones, so genes = the free inputs of the chain.
    fn settle_genes(&mut self, problem: &Problem, rng: &mut Rng) {
        let names = self.input_names();
        self.genes.retain(|k, _| names.contains(&k.as_str()));
        for &i in &self.ops.clone() {
            for inp in CATALOG[i as usize].inputs {
                if !problem.params.contains_key(inp.name) && !self.genes.contains_key(inp.name) {
                    self.genes.insert(inp.name.to_owned(), draw(inp, rng));
                }
            }
        }
    }
}

fn draw(inp: &super::catalog::Input, rng: &mut Rng) -> f64 {
    let u = rng.unit();
    if inp.log {
        m::exp(m::ln(inp.lo) + u * (m::ln(inp.hi) - m::ln(inp.lo)))
    } else {
        inp.lo + u * (inp.hi - inp.lo)
    }
}

fn input_spec(name: &str) -> Option<&'static super::catalog::Input> {
    CATALOG[1..]
        .iter()
        .flat_map(|o| o.inputs.iter())
        .find(|i| i.name == name)
}

/// Weight of an operator for a problem (module doc).
fn weight(op: &Operator, problem: &Problem) -> u64 {
    let keywords = op
        .keywords
        .iter()
        .filter(|k| problem.words.contains(*k))
        .count() as u64;
    let pinned = op
        .inputs
        .iter()
        .filter(|i| problem.params.contains_key(i.name))
        .count() as u64;
    1 + 3 * keywords + 2 * pinned
}

fn pick(problem: &Problem, rng: &mut Rng, allowed: impl Fn(usize) -> bool) -> Option<u8> {
    let candidates: Vec<(usize, u64)> = (1..CATALOG.len())
        .filter(|&i| allowed(i))
        .map(|i| (i, weight(&CATALOG[i], problem)))
        .collect();
    let total: u64 = candidates.iter().map(|c| c.1).sum();
    if total == 0 {
        return None;
    }
    let mut x = (rng.unit() * total as f64) as u64;
    for (i, w) in &candidates {
        if x < *w {
            return Some(*i as u8);
        }
        x -= w;
    }
    candidates.last().map(|c| c.0 as u8)
}

fn tail_ok(ops: &[u8], i: usize) -> bool {
    CATALOG[i].dimensionless() && !ops.contains(&(i as u8))
}

fn random_genotype(problem: &Problem, rng: &mut Rng) -> Genotype {
    let head = pick(problem, rng, |_| true).unwrap_or(1);
    let mut ops = vec![head];
    let tails = rng.below(MAX_CHAIN);
    for _ in 0..tails {
        if let Some(t) = pick(problem, rng, |i| tail_ok(&ops, i)) {
            ops.push(t);
        }
    }
    let mut g = Genotype {
        ops,
        genes: BTreeMap::new(),
    };
    g.settle_genes(problem, rng);
    g
}

/// A genotype from operator codes a model proposed; `None` if they do not form a valid
/// chain. Genes come from `like` where names match, else the middle of their range (no draw
/// from the generator, so the deterministic stream is not shifted).
pub fn genotype_from_codes(
    codes: &[String],
    like: &Genotype,
    problem: &Problem,
) -> Option<Genotype> {
    let codes: Vec<&str> = codes
        .iter()
        .map(String::as_str)
        .filter(|c| *c != "KO42")
        .collect();
    if codes.is_empty() || codes.len() > MAX_CHAIN {
        return None;
    }
    let mut ops = Vec::new();
    for (n, code) in codes.iter().enumerate() {
        let (i, _) = super::catalog::find(code)?;
        if i == KO42 || (n > 0 && !tail_ok(&ops, i)) {
            return None;
        }
        ops.push(i as u8);
    }
    let mut g = Genotype {
        ops,
        genes: BTreeMap::new(),
    };
    for name in g.input_names() {
        if problem.params.contains_key(name) {
            continue;
        }
        let v = like.genes.get(name).copied().or_else(|| {
            input_spec(name).map(|i| {
                if i.log {
                    (i.lo * i.hi).sqrt()
                } else {
                    (i.lo + i.hi) / 2.0
                }
            })
        })?;
        g.genes.insert(name.to_owned(), v);
    }
    Some(g)
}

fn crossover(a: &Genotype, b: &Genotype, rng: &mut Rng) -> Genotype {
    let mut ops = vec![a.ops[0]];
    let slots = a.ops.len().max(b.ops.len());
    for s in 1..slots {
        let from = if rng.chance(0.5) {
            a.ops.get(s)
        } else {
            b.ops.get(s)
        };
        if let Some(&i) = from {
            if tail_ok(&ops, i as usize) {
                ops.push(i);
            }
        }
    }
    let mut genes = BTreeMap::new();
    for (k, v) in a.genes.iter() {
        let v = match b.genes.get(k) {
            Some(w) if rng.chance(0.5) => *w,
            _ => *v,
        };
        genes.insert(k.clone(), v);
    }
    for (k, v) in &b.genes {
        genes.entry(k.clone()).or_insert(*v);
    }
    Genotype { ops, genes }
}

fn mutate(g: &mut Genotype, problem: &Problem, rng: &mut Rng) {
    let roll = rng.unit();
    if roll < 0.5 && !g.genes.is_empty() {
        let n = rng.below(g.genes.len());
        let name = g.genes.keys().nth(n).cloned().unwrap_or_default();
        if let (Some(spec), Some(v)) = (input_spec(&name), g.genes.get_mut(&name)) {
            let u = rng.unit() * 2.0 - 1.0;
            *v = if spec.log {
                (*v * m::exp(u * 1.5)).clamp(spec.lo, spec.hi)
            } else {
                (*v + u * 0.1 * (spec.hi - spec.lo)).clamp(spec.lo, spec.hi)
            };
        }
    } else if roll < 0.65 {
        let tail = g.ops[1..].to_vec();
        if let Some(h) = pick(problem, rng, |i| !tail.contains(&(i as u8))) {
            g.ops[0] = h;
        }
    } else if roll < 0.8 && g.ops.len() < MAX_CHAIN {
        let ops = g.ops.clone();
        if let Some(t) = pick(problem, rng, |i| tail_ok(&ops, i)) {
            g.ops.push(t);
        }
    } else if roll < 0.9 && g.ops.len() > 1 {
        let n = 1 + rng.below(g.ops.len() - 1);
        g.ops.remove(n);
    } else if g.ops.len() > 1 {
        let n = 1 + rng.below(g.ops.len() - 1);
        let ops = g.ops.clone();
        if let Some(t) = pick(problem, rng, |i| tail_ok(&ops, i)) {
            g.ops[n] = t;
        }
    }
    g.settle_genes(problem, rng);
}

fn tournament<'a>(pop: &'a [Scored], rng: &mut Rng) -> &'a Scored {
    let a = &pop[rng.below(pop.len())];
    let b = &pop[rng.below(pop.len())];
    if b.fitness < a.fitness {
        b
    } else {
        a
    }
}

/// Where a run's search stands between ticks (stored with the run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchState {
    pub rng: Rng,
    /// The generation the next tick computes.
    pub next_generation: u32,
    /// The last generation, best first.
    pub population: Vec<Scored>,
    /// Best genotype seen so far.
    pub best: Option<Scored>,
}

impl SearchState {
    pub fn new(problem_text: &str, agent_id: &str) -> SearchState {
        SearchState {
            rng: Rng::seeded(problem_text, agent_id),
            next_generation: 0,
            population: Vec::new(),
            best: None,
        }
    }
}

/// One generation, as the lineage keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub generation: u32,
    /// Best first.
    pub population: Vec<Scored>,
    /// Best so far (this or an earlier generation).
    pub best: Scored,
    /// How many genotypes came from a model's proposal (BYOK).
    pub proposed: u32,
}

impl Generation {
    pub fn to_json(&self, problem: &Problem) -> Value {
        let scored = |s: &Scored| json!({"operators": s.genotype.operators(), "genes": s.genotype.genes, "fitness": s.fitness});
        json!({
            "generation": self.generation,
            "best_fitness": self.best.fitness,
            "best": {
                "operators": self.best.genotype.operators(),
                "genes": self.best.genotype.genes,
                "fitness": self.best.fitness,
                "result": self.best.genotype.evaluate(problem).to_json(),
            },
            "population": self.population.iter().map(scored).collect::<Vec<_>>(),
            "proposed": self.proposed,
        })
    }
}

fn score(g: Genotype, problem: &Problem) -> Scored {
    let fitness = g.fitness(problem);
    Scored {
        genotype: g,
        fitness,
    }
}

/// Computes the next generation. `proposals` (BYOK) replace the last children; they use no
/// randomness, so the stream stays the deterministic one.
pub fn step(
    state: &mut SearchState,
    problem: &Problem,
    population: usize,
    proposals: &[Vec<String>],
) -> Generation {
    let population = population.max(1);
    let rng = &mut state.rng;
    let mut next: Vec<Genotype> = Vec::with_capacity(population);
    if state.population.is_empty() {
        for _ in 0..population {
            next.push(random_genotype(problem, rng));
        }
    } else {
        next.push(state.population[0].genotype.clone());
        while next.len() < population {
            let a = tournament(&state.population, rng).genotype.clone();
            let b = tournament(&state.population, rng).genotype.clone();
            let mut child = if rng.chance(0.7) {
                crossover(&a, &b, rng)
            } else {
                a
            };
            mutate(&mut child, problem, rng);
            next.push(child);
        }
    }
    let like = state
        .best
        .as_ref()
        .map(|b| b.genotype.clone())
        .unwrap_or_else(|| next[0].clone());
    let mut proposed = 0;
    for codes in proposals.iter().take(population.saturating_sub(1).max(1)) {
        if let Some(g) = genotype_from_codes(codes, &like, problem) {
            let slot = population - 1 - proposed as usize;
            next[slot] = g;
            proposed += 1;
        }
    }
    let mut scored: Vec<Scored> = next.into_iter().map(|g| score(g, problem)).collect();
    // Stable: ties keep their order, so the ranking is deterministic.
    scored.sort_by(|a, b| a.fitness.total_cmp(&b.fitness));
    let best = match &state.best {
        Some(b) if b.fitness <= scored[0].fitness => b.clone(),
        _ => scored[0].clone(),
    };
    let generation = Generation {
        generation: state.next_generation,
        population: scored.clone(),
        best: best.clone(),
        proposed,
    };
    state.population = scored;
    state.best = Some(best);
    state.next_generation += 1;
    generation
}

/// Runs a whole search without a store: the lineage a gateway must produce for these inputs
/// when no tick is killed or skipped and no model is used. Stops at `best ≤ precision` or
/// after `generations`.
pub fn replay(
    problem_text: &str,
    agent_id: &str,
    population: usize,
    generations: u32,
    precision: f64,
) -> Vec<Generation> {
    let problem = Problem::parse(problem_text);
    let mut state = SearchState::new(problem_text, agent_id);
    let mut out = Vec::new();
    for _ in 0..generations {
        let g = step(&mut state, &problem, population, &[]);
        let done = g.best.fitness <= precision;
        out.push(g);
        if done {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5b7a9c12-3f1d-4b88-9e3c-1a2b3c4d5e6f";

    #[test]
    fn same_problem_and_agent_id_give_the_same_lineage() {
        let p = "radiation shield for a Mars transit d=0.05 target=0.3";
        let a = replay(p, ID, 6, 10, 1e-4);
        let b = replay(p, ID, 6, 10, 1e-4);
        assert_eq!(a, b);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        let other = replay(p, "00000000-0000-4000-8000-000000000000", 6, 10, 1e-4);
        assert_ne!(a, other, "another agent id seeds another search");
    }

    #[test]
    fn a_search_resumed_from_stored_state_continues_identically() {
        let p = "orbit M=5.972e24 target=7000";
        let problem = Problem::parse(p);
        let whole = replay(p, ID, 4, 8, 1e-9);
        let mut state = SearchState::new(p, ID);
        let mut resumed = Vec::new();
        for _ in 0..8 {
            // Round-trip through the stored encoding each tick, as a restart would.
            let bytes = postcard::to_allocvec(&state).unwrap();
            state = postcard::from_bytes(&bytes).unwrap();
            resumed.push(step(&mut state, &problem, 4, &[]));
        }
        assert_eq!(whole.len(), resumed.len());
        assert_eq!(whole, resumed);
    }

    #[test]
    fn chains_are_ko42_first_at_most_four_and_tails_dimensionless() {
        for seed in 0..50 {
            let gens = replay("shield decay orbit", &format!("id-{seed}"), 10, 10, 0.0);
            for g in gens {
                for s in &g.population {
                    let ops = s.genotype.operators();
                    assert_eq!(ops[0], "KO42");
                    assert!((2..=4).contains(&ops.len()), "{ops:?}");
                    for &i in &s.genotype.ops[1..] {
                        assert!(CATALOG[i as usize].dimensionless());
                    }
                    assert!(s.fitness >= 0.0 && s.fitness <= FITNESS_CAP);
                }
                // Elitism: the best never gets worse.
                assert!(g.best.fitness <= g.population[0].fitness);
            }
        }
    }

    #[test]
    fn an_exact_problem_converges_and_best_never_worsens() {
        // The Sun's Schwarzschild radius: GR37 with M pinned reaches it exactly.
        let p = "schwarzschild horizon of the Sun M=1.989e30 target=2954.0";
        let gens = replay(p, ID, 10, 10, 0.001);
        let last = gens.last().unwrap();
        assert!(last.best.fitness <= 0.001, "{:?}", last.best);
        for w in gens.windows(2) {
            assert!(w[1].best.fitness <= w[0].best.fitness);
        }
    }

    #[test]
    fn default_objective_is_one_percent_sensitivity() {
        let problem = Problem::parse("no target M=1e30");
        let (gr37, _) = super::super::catalog::find("GR37").unwrap();
        let g = Genotype {
            ops: vec![gr37 as u8],
            genes: BTreeMap::new(),
        };
        // r_s is linear in M: a 1 % bump moves it 1 %.
        assert!((g.fitness(&problem) - 0.01).abs() < 1e-9);
    }

    #[test]
    fn proposals_are_validated_against_the_catalog() {
        let problem = Problem::parse("x");
        let like = Genotype {
            ops: vec![1],
            genes: BTreeMap::new(),
        };
        let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert!(genotype_from_codes(&s(&["KO42", "IS01", "SH01"]), &like, &problem).is_some());
        assert!(
            genotype_from_codes(&s(&["SH01", "IS01"]), &like, &problem).is_none(),
            "a tail must be dimensionless"
        );
        assert!(genotype_from_codes(&s(&["NOPE"]), &like, &problem).is_none());
        assert!(
            genotype_from_codes(&s(&["IS01", "SH01", "RD01", "GT01"]), &like, &problem).is_none()
        );
        assert!(genotype_from_codes(&s(&[]), &like, &problem).is_none());
    }

    #[test]
    fn xoshiro_matches_reference_output() {
        // Reference: xoshiro256** with state {1, 2, 3, 4} yields 11520, 0, 1509978240, …
        let mut r = Rng([1, 2, 3, 4]);
        assert_eq!(r.next_u64(), 11520);
        assert_eq!(r.next_u64(), 0);
        assert_eq!(r.next_u64(), 1509978240);
        assert_eq!(r.next_u64(), 1215971899390074240);
    }
}
