//! Stored-row, base64, hex and checkpoint decoding: whatever decodes must re-encode to the same bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smgate::ledger::fuzz_decode(data);
});
