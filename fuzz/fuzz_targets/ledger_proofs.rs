//! Inclusion and consistency proof checkers on arbitrary input must say no, never panic; real trees' proofs verify.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smgate::ledger::fuzz_proofs(data);
});
