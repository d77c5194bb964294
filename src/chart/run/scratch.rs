//! Scratch space a `LiveState` keeps between steps, so that a step allocates nothing for its
//! queues and state sets, and a pool of spare strings.

use super::*;

#[derive(Debug, Clone, Default)]
pub(crate) struct Scratch {
    pub(super) internal: VecDeque<Event>,
    pub(super) external: VecDeque<Event>,
    pub(super) enabled: Vec<usize>,
    pub(super) to_enter: StateSet,
    pub(super) exit: Vec<usize>,
    /// Each enabled transition's domain, taken before the exit records history.
    pub(super) domains: Vec<usize>,
    /// Buffers of dropped timer ids and event names, reused for the next `after` timer.
    pub(super) strings: Vec<String>,
    /// Objects that `assign`s replaced, reused for the next value of the same shape.
    pub(super) spares: Vec<Value>,
}

/// Most buffers [`Scratch::strings`] keeps.
const MAX_SPARE_STRINGS: usize = 8;
/// Most objects [`Scratch::spares`] keeps, and the most entries one may have: spares are
/// kept for the small records charts assign whole (`public: #{…}`), not to hold on to
/// large parts of a context.
const MAX_SPARES: usize = 4;
const MAX_SPARE_ENTRIES: usize = 16;

impl Scratch {
    /// `s` in a kept buffer large enough for it (filling a smaller one would reallocate: the
    /// names of events a host sends are often shorter than timer ids), or a new one.
    pub(super) fn string(&mut self, s: &str) -> String {
        match self.strings.iter().position(|b| b.capacity() >= s.len()) {
            Some(i) => {
                let mut b = self.strings.swap_remove(i);
                b.clear();
                b.push_str(s);
                b
            }
            None => s.to_owned(),
        }
    }

    /// Keeps `s` for [`Self::string`]; when all places are taken, in place of the smallest
    /// buffer if `s` is larger.
    pub(super) fn recycle(&mut self, s: String) {
        if !(1..=256).contains(&s.capacity()) {
            return;
        }
        if self.strings.len() < MAX_SPARE_STRINGS {
            self.strings.push(s);
        } else if let Some(small) = self
            .strings
            .iter_mut()
            .min_by_key(|b| b.capacity())
            .filter(|b| b.capacity() < s.capacity())
        {
            *small = s;
        }
    }

    /// Keeps a value an `assign` replaced when it is a small flat object.
    pub(super) fn keep_spare(&mut self, v: Value) {
        let Value::Object(m) = &v else { return };
        let flat = m.len() <= MAX_SPARE_ENTRIES
            && m.values().all(|x| match x {
                Value::String(s) => s.capacity() <= 256,
                Value::Array(_) | Value::Object(_) => false,
                _ => true,
            });
        if flat && self.spares.len() < MAX_SPARES {
            self.spares.push(v);
        }
    }

    pub(super) fn recycle_timer(&mut self, t: Timer) {
        self.recycle(t.id);
        self.recycle(t.event.name);
    }
}

/// A small set of state indices, kept sorted (document order = entry order).
#[derive(Debug, Clone, Default)]
pub(crate) struct StateSet(pub(super) Vec<usize>);

impl StateSet {
    pub(super) fn insert(&mut self, s: usize) {
        if let Err(at) = self.0.binary_search(&s) {
            self.0.insert(at, s);
        }
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, usize> {
        self.0.iter()
    }
}
