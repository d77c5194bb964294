//! Unit tests. Each test names the SCXML (or XState / DESIGN.md) rule it checks.

use serde_json::{json, Value};

use super::*;

fn chart(def: Value) -> Chart {
    Chart::compile(&def).unwrap_or_else(|e| panic!("definition should compile: {e}"))
}

fn start(c: &Chart) -> InstanceState {
    c.initial(Value::Null, &Value::Null, 0)
        .unwrap_or_else(|e| panic!("initial failed: {e}"))
        .state
}

fn send(c: &Chart, s: &InstanceState, name: &str) -> InstanceState {
    step(c, s, name).state
}

fn step(c: &Chart, s: &InstanceState, name: &str) -> Step {
    c.send(s, Event::new(name, Value::Null), &Value::Null, 0)
        .unwrap_or_else(|e| panic!("send {name} failed: {e}"))
}

fn atomics(c: &Chart, s: &InstanceState) -> Vec<String> {
    c.atomic_configuration(s)
}

fn def_err(def: Value) -> ChartError {
    match Chart::compile(&def) {
        Ok(_) => panic!("definition should be rejected"),
        Err(e) => e,
    }
}

fn sim(def: &Value, events: &[&str]) -> Vec<Value> {
    simulate(&def.to_string(), &events.join("\n"))
        .unwrap_or_else(|e| panic!("simulate failed: {e}"))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
        .collect()
}

/// `log` effects' values, in order (used to observe action order).
fn logs(step: &Step) -> Vec<Value> {
    step.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Log { value, .. } => Some(value.clone()),
            _ => None,
        })
        .collect()
}

fn log(expr: &str) -> Value {
    json!({"type": "log", "params": {"expr": expr}})
}

// ---- parsing and validation ------------------------------------------------------------------

#[test]
fn validation_unknown_key_is_an_error_with_its_path() {
    let e = def_err(json!({"states": {"a": {"onn": {}}}}));
    assert_eq!(e.path, "$.states.a.onn");
    assert_eq!(e.kind, ErrorKind::Definition);
}

#[test]
fn validation_unresolvable_target_points_at_the_target() {
    let e = def_err(json!({
        "states": {"online": {"on": {"PING": [{"target": "nowhere"}]}}}
    }));
    assert_eq!(e.path, "$.states.online.on.PING[0].target");
    assert!(e.message.contains("nowhere"), "{}", e.message);
}

#[test]
fn validation_event_keys_with_dots_are_bracketed_in_paths() {
    let e = def_err(json!({"states": {"a": {"on": {"done.state.x": "zz"}}}}));
    assert_eq!(e.path, "$.states.a.on[\"done.state.x\"]");
}

#[test]
fn validation_bare_string_action_is_rejected() {
    let e = def_err(json!({"states": {"a": {"entry": ["doThing"]}}}));
    assert_eq!(e.path, "$.states.a.entry[0]");
    assert!(e.message.contains("named action"));
}

#[test]
fn validation_unknown_action_type_and_param() {
    assert_eq!(
        def_err(json!({"states": {"a": {"entry": {"type": "spawn"}}}})).path,
        "$.states.a.entry.type"
    );
    assert_eq!(
        def_err(json!({"states": {"a": {"entry": {"type": "raise", "params": {"event": "X", "to": "y"}}}}})).path,
        "$.states.a.entry.params.to"
    );
}

#[test]
fn validation_after_keys_must_be_milliseconds() {
    let e = def_err(json!({"states": {"a": {"after": {"soon": "a"}}}}));
    assert_eq!(e.path, "$.states.a.after.soon");
}

#[test]
fn validation_two_targets_in_one_region_are_illegal() {
    let e = def_err(json!({
        "states": {"a": {"on": {"X": {"target": ["b", "c"]}}}, "b": {}, "c": {}}
    }));
    assert_eq!(e.path, "$.states.a.on.X.target");
}

#[test]
fn validation_rhai_syntax_and_unknown_variables_fail_at_compile_time() {
    let e =
        def_err(json!({"states": {"a": {"on": {"X": {"target": "a", "guard": "context.x >"}}}}}));
    assert_eq!(e.path, "$.states.a.on.X.guard");
    let e =
        def_err(json!({"states": {"a": {"on": {"X": {"target": "a", "guard": "contxt.x > 1"}}}}}));
    assert_eq!(e.path, "$.states.a.on.X.guard");
}

#[test]
fn validation_duplicate_ids_are_rejected() {
    let e = def_err(json!({"states": {"a": {"id": "b"}, "b": {}}}));
    assert_eq!(e.path, "$.states.b");
}

#[test]
fn validation_bad_descriptor() {
    assert_eq!(
        def_err(json!({"states": {"a": {"on": {"fo*o": "a"}}}})).path,
        "$.states.a.on[\"fo*o\"]"
    );
    assert_eq!(
        def_err(json!({"states": {"a": {"on": {"": "a"}}}})).path,
        "$.states.a.on[\"\"]"
    );
}

#[test]
fn validation_final_states_cannot_have_transitions() {
    let e = def_err(json!({"states": {"f": {"type": "final", "on": {"X": "f"}}}}));
    assert_eq!(e.path, "$.states.f.on");
}

#[test]
fn validation_check_reports_json_syntax_errors() {
    let e = check("{\"states\": ").unwrap_err();
    assert_eq!(e.path, "$");
    assert!(check(&json!({"states": {"a": {}}}).to_string()).is_ok());
}

#[test]
fn document_order_initial_is_first_non_history_child_even_with_number_like_keys() {
    let c = chart(json!({"states": {"h": {"type": "history"}, "10": {}, "2": {}}}));
    let s = start(&c);
    assert_eq!(c.state_value(&s), json!("10"));
}

#[test]
fn target_hash_id_exact_match_wins_over_child_path() {
    // `#a.b` names the state whose id is exactly "a.b" …
    let c = chart(json!({
        "initial": "s",
        "states": {
            "s": {"on": {"GO": "#top.b"}},
            "t": {"id": "top", "states": {"b": {}}},
            "x": {"id": "top.b"}
        }
    }));
    let s = send(&c, &start(&c), "GO");
    assert_eq!(atomics(&c, &s), vec!["top.b"]);
    assert_eq!(c.state_value(&s), json!("x"));
}

#[test]
fn target_hash_id_falls_back_to_child_of_id() {
    // … and only without such an id is it child `b` of the state with id `a`.
    let c = chart(json!({
        "initial": "s",
        "states": {
            "s": {"on": {"GO": "#top.b"}},
            "t": {"id": "top", "states": {"a": {}, "b": {}}}
        }
    }));
    let s = send(&c, &start(&c), "GO");
    assert_eq!(c.state_value(&s), json!({"t": "b"}));
}

#[test]
fn target_dot_child_and_sibling_paths() {
    let c = chart(json!({
        "states": {
            "p": {"states": {"a": {}, "b": {}}, "on": {"IN": ".b", "OUT": "q.y"}},
            "q": {"states": {"x": {}, "y": {}}}
        }
    }));
    let s = send(&c, &start(&c), "IN");
    assert_eq!(c.state_value(&s), json!({"p": "b"}));
    let s = send(&c, &s, "OUT");
    assert_eq!(c.state_value(&s), json!({"q": "y"}));
}

#[test]
fn empty_event_type_is_invalid_input() {
    let c = chart(json!({"states": {"a": {}}}));
    let s = start(&c);
    let e = c
        .send(&s, Event::new("", Value::Null), &Value::Null, 0)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Input);
}

// ---- state value -----------------------------------------------------------------------------

#[test]
fn state_value_is_printed_like_xstate() {
    let c = chart(json!({
        "initial": "p",
        "states": {
            "p": {"type": "parallel", "states": {
                "r1": {"states": {"a": {"states": {"a1": {}}}}},
                "r2": {"states": {"b": {}}},
                "r3": {}
            }},
            "z": {}
        }
    }));
    let s = start(&c);
    assert_eq!(
        c.state_value(&s),
        json!({"p": {"r1": {"a": "a1"}, "r2": "b", "r3": {}}})
    );
    let flat = chart(json!({"states": {"idle": {}}}));
    assert_eq!(flat.state_value(&start(&flat)), json!("idle"));
}

// ---- selection -------------------------------------------------------------------------------

#[test]
fn scxml_3_13_descendant_transition_preempts_ancestor() {
    let c = chart(json!({
        "states": {
            "p": {"on": {"X": "q"}, "states": {"a": {"on": {"X": "b"}}, "b": {}}},
            "q": {}
        }
    }));
    let s = send(&c, &start(&c), "X");
    assert_eq!(c.state_value(&s), json!({"p": "b"}));
    // b has no X: the event bubbles to p.
    let s = send(&c, &s, "X");
    assert_eq!(c.state_value(&s), json!("q"));
}

#[test]
fn scxml_3_13_document_order_first_enabled_transition_wins() {
    let c = chart(json!({
        "context": {"n": 1},
        "states": {
            "a": {"on": {"X": [
                {"target": "b", "guard": "context.n > 5"},
                {"target": "c", "guard": "context.n > 0"},
                {"target": "d"}
            ]}},
            "b": {}, "c": {}, "d": {}
        }
    }));
    assert_eq!(c.state_value(&send(&c, &start(&c), "X")), json!("c"));
}

#[test]
fn scxml_3_12_exact_descriptor_does_not_outrank_earlier_wildcard() {
    let c = chart(json!({
        "states": {"a": {"on": {"*": "w", "X": "x"}}, "w": {}, "x": {}}
    }));
    assert_eq!(c.state_value(&send(&c, &start(&c), "X")), json!("w"));
}

#[test]
fn scxml_3_12_descriptor_matches_token_prefixes() {
    let def = json!({
        "states": {
            "a": {"on": {"foo": "b", "bar.*": "c"}},
            "b": {"on": {"back": "a"}}, "c": {"on": {"back": "a"}}
        }
    });
    let c = chart(def);
    let s0 = start(&c);
    assert_eq!(c.state_value(&send(&c, &s0, "foo.bar")), json!("b"));
    assert_eq!(c.state_value(&send(&c, &s0, "foo")), json!("b"));
    assert_eq!(c.state_value(&send(&c, &s0, "bar")), json!("c"));
    assert_eq!(c.state_value(&send(&c, &s0, "bar.baz.q")), json!("c"));
    // `foobar` is not `foo` followed by a token.
    assert_eq!(c.state_value(&send(&c, &s0, "foobar")), json!("a"));
}

#[test]
fn scxml_3_12_star_matches_done_and_timer_events() {
    let seen =
        json!({"actions": {"type": "assign", "params": {"seen": "context.seen + [event.type]"}}});
    // `*` comes before `after` in document order, so it takes the timer event.
    let c = chart(json!({
        "context": {"seen": []},
        "states": {"a": {"on": {"*": seen}, "after": {"100": "b"}}, "b": {}}
    }));
    let s = c.advance(&start(&c), 100).unwrap().state;
    assert_eq!(s.context["seen"], json!(["xstate.after.100.a"]));
    assert_eq!(c.state_value(&s), json!("a"));
    let c = chart(json!({
        "context": {"seen": []},
        "states": {"p": {
            "on": {"*": seen},
            "states": {"a": {"on": {"END": "f"}}, "f": {"type": "final"}}
        }}
    }));
    let s = send(&c, &start(&c), "END");
    assert_eq!(s.context["seen"], json!(["done.state.p"]));
}

#[test]
fn scxml_3_12_done_descriptor_of_a_parent_also_matches_children_done_events() {
    // Dot-path ids meet prefix matching: `done.state.p` also matches `done.state.p.r1`.
    let c = chart(json!({
        "initial": "p",
        "states": {
            "p": {"type": "parallel", "on": {"done.state.p": "complete"}, "states": {
                "r1": {"states": {"a": {"on": {"A": "af"}}, "af": {"type": "final"}}},
                "r2": {"states": {"b": {}}}
            }},
            "complete": {}
        }
    }));
    assert_eq!(c.state_value(&send(&c, &start(&c), "A")), json!("complete"));
}

#[test]
fn forbidden_transition_null_consumes_the_event() {
    let c = chart(json!({
        "states": {"p": {"on": {"X": "q"}, "states": {"a": {"on": {"X": null}}}}, "q": {}}
    }));
    assert_eq!(c.state_value(&send(&c, &start(&c), "X")), json!({"p": "a"}));
}

// ---- parallel --------------------------------------------------------------------------------

#[test]
fn scxml_3_4_parallel_regions_all_take_the_event_in_document_order() {
    let c = chart(json!({
        "type": "parallel",
        "states": {
            "r1": {"states": {"a": {"on": {"X": {"target": "b", "actions": log("\"r1\"")}}}, "b": {}}},
            "r2": {"states": {"c": {"on": {"X": {"target": "d", "actions": log("\"r2\"")}}}, "d": {}}}
        }
    }));
    let st = step(&c, &start(&c), "X");
    assert_eq!(c.state_value(&st.state), json!({"r1": "b", "r2": "d"}));
    assert_eq!(logs(&st), vec![json!("r1"), json!("r2")]);
    assert_eq!(atomics(&c, &st.state), vec!["r1.b", "r2.d"]);
}

#[test]
fn scxml_3_13_conflict_resolution_descendant_wins_over_ancestor() {
    // a1 (region r1) has no X, so its candidate is p's X (to `out`); b1 (region r2) has its
    // own X. The exit sets intersect and b1 descends from p: b1's transition wins.
    let c = chart(json!({
        "initial": "p",
        "states": {
            "p": {"type": "parallel", "on": {"X": "out"}, "states": {
                "r1": {"states": {"a1": {}}},
                "r2": {"states": {"b1": {"on": {"X": "b2"}}, "b2": {}}}
            }},
            "out": {}
        }
    }));
    let s = send(&c, &start(&c), "X");
    assert_eq!(c.state_value(&s), json!({"p": {"r1": "a1", "r2": "b2"}}));
}

#[test]
fn scxml_3_13_conflict_resolution_earlier_in_document_order_wins() {
    let c = chart(json!({
        "initial": "p",
        "states": {
            "p": {"type": "parallel", "states": {
                "r1": {"states": {"a": {"on": {"X": "#o1"}}}},
                "r2": {"states": {"b": {"on": {"X": "#o2"}}}}
            }},
            "o1": {"id": "o1"},
            "o2": {"id": "o2"}
        }
    }));
    assert_eq!(c.state_value(&send(&c, &start(&c), "X")), json!("o1"));
}

#[test]
fn scxml_3_3_target_list_enters_one_state_per_region() {
    let c = chart(json!({
        "states": {
            "idle": {"on": {"GO": {"target": ["#b2", "#c2"]}}},
            "p": {"type": "parallel", "states": {
                "b": {"states": {"b1": {}, "b2": {"id": "b2"}}},
                "c": {"states": {"c1": {}, "c2": {"id": "c2"}}},
                "d": {"states": {"d1": {}, "d2": {}}}
            }}
        }
    }));
    let s = send(&c, &start(&c), "GO");
    assert_eq!(
        c.state_value(&s),
        json!({"p": {"b": "b2", "c": "c2", "d": "d1"}})
    );
}

// ---- final states and done events ------------------------------------------------------------

#[test]
fn scxml_3_7_final_child_raises_done_state_of_parent_with_output() {
    let c = chart(json!({
        "initial": "job",
        "states": {
            "job": {
                "states": {"run": {"on": {"FINISH": "ok"}}, "ok": {"type": "final", "output": "#{code: 7}"}},
                "on": {"done.state.job": {"target": "after", "actions": {"type": "assign", "params": {"code": "event.data.code"}}}}
            },
            "after": {}
        }
    }));
    let s = send(&c, &start(&c), "FINISH");
    assert_eq!(c.state_value(&s), json!("after"));
    assert_eq!(s.context["code"], json!(7));
    assert!(!s.done);
}

#[test]
fn scxml_3_4_parallel_completes_when_every_region_is_final() {
    let c = chart(json!({
        "initial": "p",
        "states": {
            "p": {"id": "par", "type": "parallel", "on": {"done.state.par": "complete"}, "states": {
                "r1": {"states": {"a": {"on": {"A": "af"}}, "af": {"type": "final"}}},
                "r2": {"states": {"b": {"on": {"B": "bf"}}, "bf": {"type": "final"}}}
            }},
            "complete": {}
        }
    }));
    let s = send(&c, &start(&c), "A");
    assert_eq!(c.state_value(&s), json!({"p": {"r1": "af", "r2": "b"}}));
    let s = send(&c, &s, "B");
    assert_eq!(c.state_value(&s), json!("complete"));
}

#[test]
fn xstate_nested_parallel_completion_propagates_to_outer_parallel() {
    // SCXML only checks the grandparent; XState v5 keeps walking up parallel ancestors.
    let c = chart(json!({
        "initial": "outer",
        "states": {
            "outer": {"id": "out", "type": "parallel", "on": {"done.state.out": "complete"}, "states": {
                "r1": {"states": {"a": {"on": {"A": "af"}}, "af": {"type": "final"}}},
                "inner": {"type": "parallel", "states": {
                    "x": {"states": {"x1": {"on": {"X": "xf"}}, "xf": {"type": "final"}}}
                }}
            }},
            "complete": {}
        }
    }));
    let s = send(&c, &start(&c), "A");
    assert_eq!(c.state_value(&s)["outer"]["r1"], json!("af"));
    let s = send(&c, &s, "X");
    assert_eq!(c.state_value(&s), json!("complete"));
}

#[test]
fn top_level_final_state_sets_done_keeps_configuration_and_ignores_events() {
    let c = chart(json!({
        "context": {"n": 2},
        "output": "#{total: context.n, last: event.data}",
        "states": {
            "a": {"on": {"END": "end"}, "after": {"5000": "a"}, "exit": log("\"exit a\"")},
            "end": {"type": "final", "output": "\"bye\"", "exit": log("\"exit end\"")}
        }
    }));
    let st = step(&c, &start(&c), "END");
    let s = st.state.clone();
    assert!(s.done);
    assert_eq!(atomics(&c, &s), vec!["end"]);
    assert_eq!(c.state_value(&s), json!("end"));
    assert_eq!(s.output, json!({"total": 2, "last": "bye"}));
    assert!(s.timers.is_empty(), "timers are cancelled once done");
    // XState v5: exit actions of all states run when the machine is done.
    assert_eq!(logs(&st), vec![json!("exit a"), json!("exit end")]);
    let again = step(&c, &s, "END");
    assert!(!again.changed);
    assert_eq!(again.state, s);
}

#[test]
fn root_parallel_with_all_regions_final_is_done() {
    let c = chart(json!({
        "type": "parallel",
        "states": {
            "r1": {"states": {"a": {"on": {"A": "f"}}, "f": {"type": "final"}}},
            "r2": {"states": {"b": {"on": {"B": "f"}}, "f": {"type": "final"}}}
        }
    }));
    let s = send(&c, &start(&c), "A");
    assert!(!s.done);
    assert!(send(&c, &s, "B").done);
}

// ---- eventless, internal and external queues ---------------------------------------------------

#[test]
fn scxml_eventless_transitions_run_until_stable() {
    let c = chart(json!({
        "context": {"n": 0},
        "states": {
            "count": {"always": [
                {"target": "done", "guard": "context.n >= 3"},
                {"actions": {"type": "assign", "params": {"n": "context.n + 1"}}}
            ]},
            "done": {}
        }
    }));
    let st = c.initial(Value::Null, &Value::Null, 0).unwrap();
    assert_eq!(c.state_value(&st.state), json!("done"));
    assert_eq!(st.state.context["n"], json!(3));
    assert_eq!(st.microsteps, 5);
}

#[test]
fn scxml_eventless_loop_is_bounded_and_fails() {
    let c = chart(json!({"states": {
        "a": {"always": {"target": "b"}}, "b": {"always": {"target": "a"}}
    }}));
    let e = c.initial(Value::Null, &Value::Null, 0).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Runtime);
    assert!(e.message.contains("settle"), "{}", e.message);
}

#[test]
fn scxml_eventless_transitions_before_internal_queue() {
    let c = chart(json!({"states": {
        "a": {
            "entry": {"type": "raise", "params": {"event": "E"}},
            "always": "b",
            "on": {"E": "c"}
        },
        "b": {"on": {"E": "d"}}, "c": {}, "d": {}
    }}));
    // `always` fires before E is taken from the internal queue; E then reaches b.
    assert_eq!(c.state_value(&start(&c)), json!("d"));
}

#[test]
fn scxml_internal_queue_before_external_queue() {
    let c = chart(json!({"states": {
        "a": {"on": {
            "GO": {"actions": [
                {"type": "send", "params": {"event": "EXT"}},
                {"type": "raise", "params": {"event": "INT"}}
            ]},
            "INT": "b",
            "EXT": "wrong"
        }},
        "b": {"on": {"EXT": "c"}}, "c": {}, "wrong": {}
    }}));
    let st = step(&c, &start(&c), "GO");
    assert_eq!(c.state_value(&st.state), json!("c"));
    assert_eq!(st.microsteps, 3);
}

#[test]
fn send_without_delay_is_processed_before_returning() {
    let c = chart(json!({"states": {
        "a": {"entry": {"type": "send", "params": {"event": "NEXT", "data": "#{k: 1}", "delay": 0}}, "on": {"NEXT": {
            "target": "b",
            "actions": {"type": "assign", "params": {"k": "event.data.k"}}
        }}},
        "b": {}
    }}));
    let s = start(&c);
    assert_eq!(c.state_value(&s), json!("b"));
    assert_eq!(s.context["k"], json!(1));
    assert!(s.timers.is_empty());
}

// ---- timers ----------------------------------------------------------------------------------

#[test]
fn after_fires_at_its_due_time_not_before() {
    let c = chart(json!({"states": {"a": {"after": {"1000": "b"}}, "b": {}}}));
    let s = start(&c);
    assert_eq!(c.next_due(&s), Some(1000));
    let early = c.advance(&s, 999).unwrap();
    assert!(!early.changed);
    let s = c.advance(&s, 1000).unwrap().state;
    assert_eq!(c.state_value(&s), json!("b"));
    assert_eq!(c.next_due(&s), None);
}

#[test]
fn after_is_cancelled_when_its_state_exits() {
    let c = chart(json!({"states": {
        "a": {"after": {"1000": "late"}, "on": {"X": "b"}}, "b": {}, "late": {}
    }}));
    let s = send(&c, &start(&c), "X");
    assert!(s.timers.is_empty());
    assert_eq!(
        c.state_value(&c.advance(&s, 5000).unwrap().state),
        json!("b")
    );
}

#[test]
fn timers_fire_in_due_order_ties_in_schedule_order() {
    let c = chart(json!({
        "context": {"order": []},
        "states": {"a": {
            "entry": [
                {"type": "send", "params": {"event": "T", "data": "\"late\"", "delay": 300}},
                {"type": "send", "params": {"event": "T", "data": "\"first\"", "delay": 100}},
                {"type": "send", "params": {"event": "T", "data": "\"second\"", "delay": 100}}
            ],
            "on": {"T": {"actions": {"type": "assign", "params": {"order": "context.order + [event.data]"}}}}
        }}
    }));
    let s = c.advance(&start(&c), 1000).unwrap().state;
    assert_eq!(s.context["order"], json!(["first", "second", "late"]));
}

#[test]
fn timers_that_come_due_during_an_advance_fire_in_it() {
    let c = chart(json!({"states": {
        "a": {"after": {"100": "b"}}, "b": {"after": {"100": "c"}}, "c": {}
    }}));
    let s = c.advance(&start(&c), 250).unwrap().state;
    assert_eq!(c.state_value(&s), json!("c"));
    // b was entered at its due time 100, so c's timer was due at 200, not 350.
    let s2 = c.advance(&start(&c), 199).unwrap().state;
    assert_eq!(c.state_value(&s2), json!("b"));
}

#[test]
fn cancel_removes_a_delayed_send() {
    let c = chart(json!({"states": {"a": {
        "entry": {"type": "send", "params": {"event": "BOOM", "delay": 100, "id": "bomb"}},
        "on": {"DEFUSE": {"actions": {"type": "cancel", "params": {"id": "bomb"}}}, "BOOM": "boom"}
    }, "boom": {}}}));
    let s = start(&c);
    assert_eq!(s.timers.len(), 1);
    assert_eq!(s.timers[0].id, "bomb");
    let s = send(&c, &s, "DEFUSE");
    assert!(s.timers.is_empty());
    assert_eq!(
        c.state_value(&c.advance(&s, 1000).unwrap().state),
        json!("a")
    );
}

#[test]
fn zero_delay_after_loop_is_bounded_per_advance() {
    let c = chart(json!({"states": {"a": {"after": {"0": {"target": "a"}}}}}));
    let s = start(&c);
    let st = c.advance(&s, 0).unwrap();
    assert!(
        c.next_due(&st.state).is_some_and(|d| d <= 0),
        "work remains for the host"
    );
    assert!(simulate(
        &json!({"states": {"a": {"after": {"0": "a"}}}}).to_string(),
        "X"
    )
    .is_err());
}

// ---- transitions: internal / external ----------------------------------------------------------

#[test]
fn scxml_3_13_external_self_transition_exits_and_reenters() {
    let c = chart(json!({"states": {"a": {
        "entry": log("\"enter\""), "exit": log("\"exit\""),
        "on": {"X": "a"}
    }}}));
    assert_eq!(
        logs(&step(&c, &start(&c), "X")),
        vec![json!("exit"), json!("enter")]
    );
}

#[test]
fn scxml_3_13_internal_transition_to_descendant_keeps_source() {
    let def = |reenter: bool| {
        json!({"states": {"p": {
            "entry": log("\"enter p\""), "exit": log("\"exit p\""),
            "on": {"X": {"target": ".b", "reenter": reenter}},
            "states": {"a": {}, "b": {}}
        }}})
    };
    let c = chart(def(false));
    let st = step(&c, &start(&c), "X");
    assert_eq!(logs(&st), Vec::<Value>::new());
    assert_eq!(c.state_value(&st.state), json!({"p": "b"}));
    let c = chart(def(true));
    let st = step(&c, &start(&c), "X");
    assert_eq!(logs(&st), vec![json!("exit p"), json!("enter p")]);
}

#[test]
fn scxml_3_13_targetless_transition_runs_actions_without_exit() {
    let c = chart(json!({"context": {"n": 0}, "states": {"a": {
        "exit": log("\"exit\""),
        "on": {"X": {"actions": {"type": "assign", "params": {"n": "context.n + 1"}}}}
    }}}));
    let st = step(&c, &start(&c), "X");
    assert!(logs(&st).is_empty());
    assert_eq!(st.state.context["n"], json!(1));
}

#[test]
fn scxml_microstep_order_exit_then_transition_actions_then_entry() {
    let c = chart(json!({"states": {
        "a": {"exit": log("\"exit a\""), "on": {"X": {"target": "b", "actions": log("\"t\"")}}},
        "b": {"entry": log("\"enter b\"")}
    }}));
    assert_eq!(
        logs(&step(&c, &start(&c), "X")),
        vec![json!("exit a"), json!("t"), json!("enter b")]
    );
}

#[test]
fn scxml_exit_order_descendants_before_ancestors_entry_reverse() {
    let c = chart(json!({"states": {
        "p": {"exit": log("\"exit p\""), "entry": log("\"enter p\""), "on": {"X": "q"},
              "states": {"c": {"exit": log("\"exit c\""), "entry": log("\"enter c\"")}}},
        "q": {"entry": log("\"enter q\""), "states": {"d": {"entry": log("\"enter d\"")}}}
    }}));
    let st = c.initial(Value::Null, &Value::Null, 0).unwrap();
    assert_eq!(logs(&st), vec![json!("enter p"), json!("enter c")]);
    assert_eq!(
        logs(&step(&c, &st.state, "X")),
        vec![
            json!("exit c"),
            json!("exit p"),
            json!("enter q"),
            json!("enter d")
        ]
    );
}

// ---- history ---------------------------------------------------------------------------------

fn history_def(kind: &str) -> Value {
    json!({"states": {
        "p": {
            "on": {"OUT": "q"},
            "states": {
                "a": {"on": {"NEXT": "b"}},
                "b": {"states": {"b1": {"on": {"NEXT": "b2"}}, "b2": {}}},
                "h": {"type": "history", "history": kind}
            }
        },
        "q": {"on": {"BACK": "p.h"}}
    }})
}

#[test]
fn history_shallow_restores_direct_child_with_its_default_entry() {
    let c = chart(history_def("shallow"));
    let s = start(&c);
    let s = send(&c, &s, "NEXT");
    let s = send(&c, &s, "NEXT");
    assert_eq!(c.state_value(&s), json!({"p": {"b": "b2"}}));
    let s = send(&c, &s, "OUT");
    assert_eq!(s.history.get("p.h"), Some(&vec!["p.b".to_string()]));
    let s = send(&c, &s, "BACK");
    assert_eq!(c.state_value(&s), json!({"p": {"b": "b1"}}));
}

#[test]
fn history_deep_restores_nested_config() {
    let c = chart(history_def("deep"));
    let s = start(&c);
    let s = send(&c, &s, "NEXT");
    let s = send(&c, &s, "NEXT");
    let s = send(&c, &s, "OUT");
    let s = send(&c, &s, "BACK");
    assert_eq!(c.state_value(&s), json!({"p": {"b": "b2"}}));
}

#[test]
fn history_without_record_uses_default_target_then_parent_initial() {
    let c = chart(json!({"initial": "q", "states": {
        "p": {"states": {"a": {}, "b": {}, "h": {"type": "history", "target": "b"}, "h2": {"type": "history"}}},
        "q": {"on": {"H": "p.h", "H2": "p.h2"}}
    }}));
    let s = start(&c);
    assert_eq!(c.state_value(&send(&c, &s, "H")), json!({"p": "b"}));
    assert_eq!(c.state_value(&send(&c, &s, "H2")), json!({"p": "a"}));
}

#[test]
fn history_deep_in_parallel_restores_every_region() {
    let c = chart(json!({"states": {
        "p": {"type": "parallel", "on": {"OUT": "q"}, "states": {
            "r1": {"states": {"a": {"on": {"A": "b"}}, "b": {}}},
            "r2": {"states": {"c": {"on": {"C": "d"}}, "d": {}}},
            "h": {"type": "history", "history": "deep"}
        }},
        "q": {"on": {"BACK": "p.h"}}
    }}));
    let s = start(&c);
    let s = send(&c, &s, "A");
    let s = send(&c, &s, "C");
    let s = send(&c, &s, "OUT");
    assert_eq!(c.state_value(&s), json!("q"));
    let s = send(&c, &s, "BACK");
    assert_eq!(c.state_value(&s), json!({"p": {"r1": "b", "r2": "d"}}));
}

/// SCXML microstep: the entry set is computed from the transition's domain, the one its exit
/// set was computed from. A region of a parallel state targeting that state's deep history
/// exits the parallel state (its LCCA is the root); once history is recorded the effective
/// target lies inside the source, but the domain stays the root, so the parallel state is
/// re-entered with the recorded configuration (found by the property test).
#[test]
fn history_target_inside_the_source_keeps_the_domain_of_the_exit() {
    let c = chart(json!({"states": {
        "p": {"type": "parallel", "states": {
            "r1": {"states": {"a": {}}, "on": {"GO": {"target": "#ph"}}},
            "h": {"id": "ph", "type": "history", "history": "deep"}
        }},
        "q": {}
    }}));
    let s = start(&c);
    assert_eq!(c.state_value(&s), json!({"p": {"r1": "a"}}));
    let st = step(&c, &s, "GO");
    c.check_state(&st.state)
        .unwrap_or_else(|e| panic!("illegal configuration: {e}"));
    assert_eq!(c.state_value(&st.state), json!({"p": {"r1": "a"}}));
    assert_eq!(
        st.state.configuration.len(),
        3,
        "{:?}",
        st.state.configuration
    );
}

#[test]
fn history_as_initial_state_and_list_default_target() {
    // `initial` on a parallel is rejected; on a compound it may name a history child.
    let e = def_err(
        json!({"states": {"p": {"initial": "r1", "type": "parallel", "states": {"r1": {}}}}}),
    );
    assert_eq!(e.path, "$.states.p.initial");
    let c = chart(json!({"states": {
        "w": {"initial": "h", "states": {
            "h": {"type": "history", "history": "deep", "target": ["par.r1.b", "par.r2.d"]},
            "par": {"type": "parallel", "states": {
                "r1": {"states": {"a": {}, "b": {}}},
                "r2": {"states": {"c": {}, "d": {}}}
            }}
        }}
    }}));
    assert_eq!(
        c.state_value(&start(&c)),
        json!({"w": {"par": {"r1": "b", "r2": "d"}}})
    );
}

// ---- actions and expressions -------------------------------------------------------------------

#[test]
fn assign_properties_all_see_the_context_before_the_assign() {
    let c = chart(
        json!({"context": {"a": 1, "b": 10}, "states": {"s": {"on": {"X": {"actions": [
            {"type": "assign", "params": {"a": "context.b", "b": "context.a", "lit": [1, 2]}}
        ]}}}}}),
    );
    let s = send(&c, &start(&c), "X");
    assert_eq!(s.context, json!({"a": 10, "b": 1, "lit": [1, 2]}));
}

#[test]
fn initial_context_is_merged_over_definition_context() {
    let c = chart(json!({"context": {"a": 1, "b": 2}, "states": {"s": {}}}));
    let s = c
        .initial(json!({"b": 3, "c": 4}), &Value::Null, 0)
        .unwrap()
        .state;
    assert_eq!(s.context, json!({"a": 1, "b": 3, "c": 4}));
    assert_eq!(
        c.initial(json!([1]), &Value::Null, 0).unwrap_err().kind,
        ErrorKind::Input
    );
}

#[test]
fn expressions_see_event_type_data_and_auth() {
    let c = chart(
        json!({"states": {"s": {"on": {"SET": {"actions": {"type": "assign", "params": {
            "got": "#{t: event.type, d: event.data.v, who: auth.user}"
        }}}}}}}),
    );
    let s = start(&c);
    let s = c
        .send(
            &s,
            Event::new("SET", json!({"v": 5})),
            &json!({"user": "u1"}),
            0,
        )
        .unwrap()
        .state;
    assert_eq!(s.context["got"], json!({"d": 5, "t": "SET", "who": "u1"}));
}

#[test]
fn scxml_in_predicate_in_state_sees_current_configuration() {
    let c = chart(json!({"type": "parallel", "states": {
        "mode": {"states": {"off": {"on": {"ON": "on"}}, "on": {}}},
        "lamp": {"states": {"dark": {"on": {"TICK": {"target": "lit", "guard": "in_state(\"mode.on\")"}}}, "lit": {}}}
    }}));
    let s = start(&c);
    assert_eq!(c.state_value(&send(&c, &s, "TICK"))["lamp"], json!("dark"));
    let s = send(&c, &s, "ON");
    let s = send(&c, &s, "TICK");
    assert_eq!(c.state_value(&s)["lamp"], json!("lit"));
}

#[test]
fn log_and_emit_become_effects_in_order() {
    let c = chart(
        json!({"context": {"public": {"n": 3}}, "states": {"s": {"on": {"X": {"actions": [
            {"type": "log", "params": {"label": "n", "expr": "context.public.n"}},
            {"type": "emit", "params": {"topic": "t/1", "expr": "#{n: context.public.n}"}},
            {"type": "emit", "params": {"event": "changed"}}
        ]}}}}}),
    );
    let st = step(&c, &start(&c), "X");
    assert_eq!(
        st.effects,
        vec![
            Effect::Log {
                label: Some("n".into()),
                value: json!(3)
            },
            Effect::Emit {
                topic: Some("t/1".into()),
                event: None,
                data: json!({"n": 3})
            },
            Effect::Emit {
                topic: None,
                event: Some("changed".into()),
                data: Value::Null
            },
        ]
    );
    assert!(!st.changed, "effects alone do not change the state");
}

#[test]
fn guard_must_return_bool() {
    let c = chart(json!({"states": {"s": {"on": {"X": {"target": "s", "guard": "42"}}}}}));
    let e = c
        .send(&start(&c), Event::new("X", Value::Null), &Value::Null, 0)
        .unwrap_err();
    assert_eq!(e.path, "$.states.s.on.X.guard");
    assert!(e.message.contains("bool"), "{}", e.message);
}

fn hostile(expr: &str) -> ChartError {
    let c = chart(
        json!({"states": {"s": {"on": {"X": {"actions": {"type": "assign", "params": {"v": expr}}}}}}}),
    );
    c.send(&start(&c), Event::new("X", Value::Null), &Value::Null, 0)
        .unwrap_err()
}

#[test]
fn sandbox_endless_loop_hits_the_operation_limit() {
    let e = hostile("loop { }");
    assert!(e.message.contains("operations"), "{}", e.message);
    assert_eq!(e.path, "$.states.s.on.X.actions.params.v");
}

#[test]
fn sandbox_huge_strings_and_arrays_are_refused() {
    let e = hostile("let s = \"xxxxxxxxxxxxxxxx\"; loop { s += s; }");
    assert!(
        e.message.contains("too large") || e.message.contains("operations"),
        "{}",
        e.message
    );
    let e = hostile("let a = []; loop { a.push(1); }");
    assert!(
        e.message.contains("too large") || e.message.contains("operations"),
        "{}",
        e.message
    );
}

#[test]
fn sandbox_deep_nesting_and_recursion_fail_cleanly() {
    let deep = format!("{}1{}", "(".repeat(500), ")".repeat(500));
    let e = def_err(json!({"states": {"s": {"entry": {"type": "log", "params": {"expr": deep}}}}}));
    assert_eq!(e.path, "$.states.s.entry.params.expr");
    let e = hostile("fn f(x) { f(x + 1) } f(0)");
    assert_eq!(e.kind, ErrorKind::Runtime);
}

#[test]
fn sandbox_huge_expression_source_is_refused_at_its_path() {
    let huge = format!("\"{}\"", "x".repeat(expr::MAX_SOURCE_LEN + 1));
    let e = def_err(json!({"states": {"s": {"entry": {"type": "log", "params": {"expr": huge}}}}}));
    assert_eq!(e.path, "$.states.s.entry.params.expr");
    assert!(e.message.contains("longer than"), "{}", e.message);
}

#[test]
fn sandbox_huge_string_built_in_one_call_is_refused() {
    let e = hostile("\"\".pad(10000000, \"x\")");
    assert_eq!(e.kind, ErrorKind::Runtime);
    assert!(e.message.contains("too large"), "{}", e.message);
}

#[test]
fn sandbox_deeply_nested_map_literals_fail_at_compile_time() {
    let deep = format!("{}1{}", "#{a: ".repeat(200), "}".repeat(200));
    let e = def_err(json!({"states": {"s": {"entry": {"type": "log", "params": {"expr": deep}}}}}));
    assert_eq!(e.path, "$.states.s.entry.params.expr");
    assert_eq!(e.kind, ErrorKind::Definition);
}

#[test]
fn definition_nested_past_the_json_depth_limit_is_a_clear_error() {
    let deep = format!(
        "{}{{}}{}",
        "{\"states\": {\"s\": ".repeat(200),
        "}}".repeat(200)
    );
    let e = Chart::from_json_str(&deep).unwrap_err();
    assert_eq!((e.path.as_str(), e.kind), ("$", ErrorKind::Definition));
    assert!(e.message.contains("recursion limit"), "{}", e.message);
    // Within the JSON limit, deep state nesting compiles and runs.
    let ok = format!(
        "{}{{}}{}",
        "{\"states\": {\"s\": ".repeat(60),
        "}}".repeat(60)
    );
    let c = Chart::from_json_str(&ok).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(atomics(&c, &start(&c)).len(), 1);
}

#[test]
fn sandbox_has_no_eval_print_or_clock() {
    for src in [
        "eval(\"1\")",
        "print(\"x\")",
        "debug(1)",
        "timestamp()",
        "sleep(1)",
    ] {
        let r = Chart::compile(
            &json!({"states": {"s": {"entry": {"type": "log", "params": {"expr": src}}}}}),
        );
        match r {
            Err(e) => assert_eq!(e.kind, ErrorKind::Definition),
            Ok(c) => {
                let e = c.initial(Value::Null, &Value::Null, 0).unwrap_err();
                assert!(e.message.contains("not found"), "{src}: {e}");
            }
        }
    }
}

// ---- authorizers and views ---------------------------------------------------------------------

#[test]
fn authorizers_allow_read_and_write() {
    let c = chart(json!({
        "authorizers": {
            "allowRead": "auth.role == \"admin\" || state == \"open\"",
            "allowWrite": "type == \"initialization\" || (event.type != \"NUKE\" && context.owner == auth.user)"
        },
        "context": {"owner": "u1"},
        "states": {"open": {"on": {"LOCK": "locked"}}, "locked": {}}
    }));
    let s = start(&c);
    assert!(c.allow_read(&s, &json!({"role": "viewer"})).unwrap());
    let locked = send(&c, &s, "LOCK");
    assert!(!c.allow_read(&locked, &json!({"role": "viewer"})).unwrap());
    assert!(c.allow_read(&locked, &json!({"role": "admin"})).unwrap());
    let ctx = json!({"owner": "u1"});
    assert!(c
        .allow_write(WriteKind::Initialization, None, &ctx, &Value::Null)
        .unwrap());
    let ev = Event::new("PING", Value::Null);
    assert!(c
        .allow_write(WriteKind::Event, Some(&ev), &ctx, &json!({"user": "u1"}))
        .unwrap());
    assert!(!c
        .allow_write(WriteKind::Event, Some(&ev), &ctx, &json!({"user": "u2"}))
        .unwrap());
    let nuke = Event::new("NUKE", Value::Null);
    assert!(!c
        .allow_write(WriteKind::Event, Some(&nuke), &ctx, &json!({"user": "u1"}))
        .unwrap());
}

#[test]
fn authorizers_absent_allow_and_non_bool_is_an_error() {
    let open = chart(json!({"states": {"s": {}}}));
    let s = start(&open);
    assert!(open.allow_read(&s, &Value::Null).unwrap());
    assert!(open
        .allow_write(WriteKind::Event, None, &s.context, &Value::Null)
        .unwrap());
    let bad = chart(json!({"authorizers": {"allowRead": "1"}, "states": {"s": {}}}));
    assert!(bad.allow_read(&s, &Value::Null).is_err());
    assert_eq!(
        def_err(json!({"authorizers": {"allowDelete": "true"}, "states": {"s": {}}})).path,
        "$.authorizers.allowDelete"
    );
}

#[test]
fn public_context_tags_and_has_state() {
    let c = chart(
        json!({"context": {"public": {"x": 1}, "secret": 2}, "states": {
            "p": {"tags": ["busy", "a"], "states": {"c": {"tags": "a"}}}
        }}),
    );
    let s = start(&c);
    assert_eq!(c.public_context(&s), json!({"x": 1}));
    assert_eq!(c.tags(&s), vec!["a", "busy"]);
    assert!(c.has_state("p.c") && c.has_state("p") && !c.has_state("c"));
    let empty = chart(json!({"states": {"s": {}}}));
    assert_eq!(empty.public_context(&start(&empty)), json!({}));
}

// ---- instance state ----------------------------------------------------------------------------

#[test]
fn instance_state_round_trips_through_serde_json() {
    let c = chart(history_def("deep"));
    let s = start(&c);
    let s = send(&c, &s, "NEXT");
    let s = send(&c, &s, "OUT");
    let bytes = serde_json::to_vec(&s).unwrap();
    let back: InstanceState = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(back, s);
    assert_eq!(serde_json::to_vec(&back).unwrap(), bytes);
}

#[test]
fn loading_an_illegal_or_foreign_configuration_is_an_input_error() {
    let c = chart(json!({"states": {"a": {}, "b": {}}}));
    let mut s = start(&c);
    s.configuration = vec!["a".into(), "b".into()];
    assert_eq!(
        c.send(&s, Event::new("X", Value::Null), &Value::Null, 0)
            .unwrap_err()
            .kind,
        ErrorKind::Input
    );
    s.configuration = vec!["zzz".into()];
    assert_eq!(
        c.send(&s, Event::new("X", Value::Null), &Value::Null, 0)
            .unwrap_err()
            .kind,
        ErrorKind::Input
    );
}

// ---- the heartbeat example and simulate ----------------------------------------------------------

fn heartbeat() -> Value {
    let beat = json!({"type": "assign", "params": {
        "public": "#{beats: context.public.beats + 1, battery: event.data.battery}"
    }});
    json!({
        "id": "heartbeat",
        "context": {"public": {"beats": 0, "battery": null}},
        "initial": "online",
        "states": {
            "online": {"tags": ["up"], "after": {"30000": "stale"},
                       "on": {"HEARTBEAT": {"target": "online", "actions": beat}}},
            "stale": {"tags": ["degraded"], "after": {"60000": "offline"},
                      "on": {"HEARTBEAT": {"target": "online", "actions": beat}}},
            "offline": {"tags": ["down"],
                        "on": {"HEARTBEAT": {"target": "online", "actions": beat}}}
        }
    })
}

#[test]
fn heartbeat_online_stale_offline_and_back() {
    let out = sim(
        &heartbeat(),
        &[
            r#"{"type":"HEARTBEAT","battery":90}"#,
            r#"{"type":"$advance","ms":29999}"#,
            r#"{"type":"$advance","ms":1}"#,
            r#"{"type":"$advance","ms":60000}"#,
            r#"{"type":"HEARTBEAT","battery":80}"#,
            r#"{"type":"$advance","ms":100000}"#,
        ],
    );
    let values: Vec<&Value> = out.iter().map(|l| &l["value"]).collect();
    assert_eq!(
        values,
        vec!["online", "online", "stale", "offline", "online", "offline"]
    );
    assert_eq!(out[2]["tags"], json!(["degraded"]));
    assert_eq!(out[3]["tags"], json!(["down"]));
    assert_eq!(
        out[4]["context"]["public"],
        json!({"beats": 2, "battery": 80})
    );
    // A heartbeat re-enters online, restarting its 30 s timer.
    let c = chart(heartbeat());
    let s = start(&c);
    let s = c
        .send(
            &s,
            Event::new("HEARTBEAT", json!({"battery": 1})),
            &Value::Null,
            20_000,
        )
        .unwrap()
        .state;
    assert_eq!(c.next_due(&s), Some(50_000));
    assert_eq!(c.public_context(&s), json!({"beats": 1, "battery": 1}));
}

#[test]
fn simulate_prints_one_line_per_input_with_keys_in_order() {
    let lines = simulate(
        &json!({"states": {"a": {"on": {"GO": "b"}}, "b": {"type": "final"}}}).to_string(),
        "GO\n\n\"GO\"\n",
    )
    .unwrap();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[0],
        r#"{"value":"b","configuration":["b"],"tags":[],"done":true,"context":{}}"#
    );
    assert_eq!(lines[0], lines[1]);
}

#[test]
fn simulate_reports_bad_input_lines() {
    let def = json!({"states": {"a": {}}}).to_string();
    assert_eq!(simulate(&def, "{\"ms\": 1}").unwrap_err().path, "events:1");
    assert_eq!(
        simulate(&def, "A\n{\"type\":\"$advance\",\"ms\":-1}")
            .unwrap_err()
            .path,
        "events:2"
    );
}

#[test]
fn fuzz_one_survives_garbage() {
    fuzz_one(b"");
    fuzz_one(b"\xff\xfe{");
    fuzz_one(heartbeat().to_string().as_bytes());
    fuzz_one(b"{\"states\":{\"a\":{\"always\":\"a\"}}}\0A");
}

#[test]
fn root_parallel_domain_reenters_untargeted_regions_by_default() {
    // SCXML's <scxml> is never parallel; ours may be. A transition whose domain is the root
    // exits every region, so regions without a target come back in their initial state.
    let c = chart(json!({"type": "parallel", "states": {
        "r1": {"states": {"a": {"on": {"GO": "b"}}, "b": {"on": {"X": "#c2"}}}},
        "r2": {"states": {"c1": {}, "c2": {"id": "c2"}}}
    }}));
    let s = send(&c, &start(&c), "GO");
    assert_eq!(c.state_value(&s), json!({"r1": "b", "r2": "c1"}));
    let s = send(&c, &s, "X");
    assert_eq!(c.state_value(&s), json!({"r1": "a", "r2": "c2"}));
    assert!(c.check_state(&s).is_ok());
}

#[test]
fn context_over_400_kb_fails_the_step() {
    let c = chart(
        json!({"states": {"s": {"on": {"BIG": {"actions": {"type": "assign", "params": {
            "a": "let s = \"x\"; s.pad(300000, 'x'); s", "b": "let s = \"y\"; s.pad(300000, 'y'); s"
        }}}}}}}),
    );
    let e = c
        .send(&start(&c), Event::new("BIG", Value::Null), &Value::Null, 0)
        .unwrap_err();
    assert_eq!(e.path, "$.context");
}

#[test]
fn sandbox_operation_budget_is_shared_by_all_expressions_of_a_call() {
    // Each guard stays under the per-expression limit, but 1000 of them exceed the call budget.
    let c = chart(
        json!({"context": {"n": 0}, "states": {"s": {"on": {"GO": {"actions": {"type": "raise", "params": {"event": "T"}}},
        "T": {"guard": "let i = 0; while i < 20000 { i += 1; } true",
              "actions": [{"type": "assign", "params": {"n": "context.n + 1"}}, {"type": "raise", "params": {"event": "T"}}]}}}}}),
    );
    let e = c
        .send(&start(&c), Event::new("GO", Value::Null), &Value::Null, 0)
        .unwrap_err();
    assert!(
        e.message.contains("budget") || e.message.contains("settle"),
        "{}",
        e.message
    );
    assert!(e.message.contains("budget"), "{}", e.message);
}

#[test]
fn scxml_3_13_internal_transition_from_parallel_source_is_external() {
    // SCXML getTransitionDomain: type="internal" keeps the source only if it is compound.
    let c = chart(json!({"states": {"p": {
        "type": "parallel", "entry": log("\"enter p\""), "exit": log("\"exit p\""),
        "on": {"X": {"target": ".r1.b"}},
        "states": {"r1": {"states": {"a": {}, "b": {}}}, "r2": {"states": {"c": {"on": {"C": "d"}}, "d": {}}}}
    }}}));
    let s = send(&c, &start(&c), "C");
    let st = step(&c, &s, "X");
    assert_eq!(logs(&st), vec![json!("exit p"), json!("enter p")]);
    assert_eq!(
        c.state_value(&st.state),
        json!({"p": {"r1": "b", "r2": "c"}})
    );
}

#[test]
fn instance_state_missing_optional_fields_deserialize_with_defaults() {
    let s: InstanceState =
        serde_json::from_value(json!({"configuration": ["a"], "context": {}})).unwrap();
    assert!(s.timers.is_empty() && !s.done && s.output.is_null());
}

#[test]
fn advance_stops_early_with_timers_still_due_when_work_piles_up() {
    let c = chart(json!({"context": {"n": 0}, "states": {"a": {
        "entry": {"type": "assign", "params": {"n": "let i = 0; while i < 20000 { i += 1; } context.n + 1"}},
        "after": {"1": "a"}
    }}}));
    let st = c.advance(&start(&c), 1000).unwrap();
    let n = st.state.context["n"].as_i64().unwrap_or(0);
    assert!(n > 2 && n < 1000, "n = {n}");
    assert!(
        c.next_due(&st.state).is_some_and(|d| d <= 1000),
        "the host calls advance again"
    );
}

// ---- LiveState (the working form hosts keep loaded) -----------------------------------------

#[test]
fn live_state_steps_like_the_stored_form_and_encodes_its_bytes() {
    let c = chart(
        json!({"id": "m", "initial": "a", "context": {"n": 0}, "states": {
            "a": {"on": {"GO": {"target": "b", "actions": {"type": "assign", "params": {"n": "context.n + 1"}}}}},
            "b": {"initial": "x", "states": {"x": {}, "h": {"type": "history"}},
                  "after": {"1000": "a"}, "on": {"BACK": "a"}}
        }}),
    );
    let mut stored = start(&c);
    let mut live = c.load(&stored).unwrap();
    for (name, now) in [("GO", 0), ("BACK", 10), ("GO", 20)] {
        stored = c
            .send(&stored, Event::new(name, Value::Null), &Value::Null, now)
            .unwrap()
            .state;
        c.send_live(&mut live, Event::new(name, Value::Null), &Value::Null, now)
            .unwrap();
        assert_eq!(c.store(&live), stored);
    }
    assert_eq!(live.next_due(), Some(1020));
    stored = c.advance(&stored, 1020).unwrap().state;
    c.advance_live(&mut live, 1020).unwrap();
    assert_eq!(c.store(&live), stored);
    assert_eq!(c.live_value(&live), json!("a"));
    assert!(!stored.history.is_empty(), "leaving b records its history");
    let mut bytes = b"prefix".to_vec();
    c.encode(&live, &mut bytes);
    assert_eq!(&bytes[6..], serde_json::to_vec(&stored).unwrap().as_slice());
}

#[test]
fn live_state_is_broken_by_a_failed_step_until_loaded_again() {
    // DESIGN: a failing step fails the whole call and the host keeps its previous state; a
    // LiveState cannot roll back by itself, so it refuses further steps instead.
    let c = chart(json!({"initial": "a", "context": {"n": 0}, "states": {
        "a": {"on": {
            "BAD": {"guard": "context.n.nope()", "target": "b"},
            "GO": "b"
        }},
        "b": {}
    }}));
    let stored = start(&c);
    let mut live = c.load(&stored).unwrap();
    let e = c
        .send_live(&mut live, Event::new("BAD", Value::Null), &Value::Null, 0)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Runtime);
    assert!(live.is_broken());
    let again = c
        .send_live(&mut live, Event::new("GO", Value::Null), &Value::Null, 0)
        .unwrap_err();
    assert_eq!(again.kind, ErrorKind::Input);
    assert_eq!(
        c.live_value(&live),
        json!({}),
        "a broken state reads as empty"
    );
    let mut live = c.load(&stored).unwrap();
    c.send_live(&mut live, Event::new("GO", Value::Null), &Value::Null, 0)
        .unwrap();
    assert_eq!(c.live_value(&live), json!("b"));
}

#[test]
fn live_state_of_another_chart_version_is_refused() {
    let small = chart(json!({"initial": "a", "states": {"a": {}}}));
    let big = chart(json!({"initial": "a", "states": {"a": {}, "b": {}}}));
    let mut live = small.load(&start(&small)).unwrap();
    let e = big
        .send_live(&mut live, Event::new("GO", Value::Null), &Value::Null, 0)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Input);
}

#[test]
fn encoded_bytes_match_serde_json_for_awkward_ids_strings_and_floats() {
    // The stored bytes are written by hand (run::encode); they must stay exactly
    // serde_json's compact output of the InstanceState, escaping and float formatting included.
    let weird = "q\"b\\s/n\nt\tc\u{1}\u{1f}d\u{7f}é😀\u{2028}";
    let c = chart(json!({"id": "m", "initial": weird, "context": {
        "s": weird, "f": [0.1, 1e300, -0.0, 3.0, 1.5e-7, -2.5, 123456789.125],
        "i": [0, -1, 9007199254740993u64, i64::MIN], "n": null, "b": [true, false],
        weird: {"": "", "\u{0}": "\u{0}"}
    }, "states": {
        weird: {"on": {"GO": "p\"ar"}},
        "p\"ar": {"initial": "x\\1", "states": {
            "x\\1": {"on": {"NEXT": "y\u{7}"}}, "y\u{7}": {},
            "h\"ist": {"type": "history", "history": "deep"}},
            "after": {"1000": weird},
            "entry": {"type": "send", "params": {"event": "T\"", "data": "#{v: 0.3, s: \"a\\\"b\\\\c\\n\"}", "delay": 500}},
            "on": {"BACK": weird}}
    }}));
    let mut live = c.load(&start(&c)).unwrap();
    let check = |live: &LiveState| {
        let mut bytes = Vec::new();
        c.encode(live, &mut bytes);
        let want = serde_json::to_vec(&c.store(live)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&want)
        );
        assert_eq!(bytes, want);
    };
    check(&live);
    for (name, now) in [("GO", 0), ("NEXT", 1), ("BACK", 2), ("GO", 3)] {
        c.send_live(
            &mut live,
            Event::new(name, json!({"x": 0.1, "w": weird})),
            &Value::Null,
            now,
        )
        .unwrap();
        check(&live);
    }
    assert!(
        !c.store(&live).history.is_empty(),
        "the history was recorded"
    );
    assert!(!c.store(&live).timers.is_empty(), "timers are pending");
}
