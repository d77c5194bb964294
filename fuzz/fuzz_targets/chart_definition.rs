//! Definition parsing, compilation, simulation and Rhai evaluation: errors are fine; panics, hangs and runaway memory are not.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smgate::chart::fuzz_one(data);
});
