//! Recipe diagnostics, rendered as users see them (unicode, no colour, 80 columns) and
//! snapshotted; plus a property test that no input makes the loader panic.

use std::path::Path;

use miette::{GraphicalReportHandler, GraphicalTheme};
use proptest::prelude::*;

use super::{ProblemKind, Recipe, RecipeError};

fn load(text: &str, overrides: &[&str]) -> Result<Recipe, RecipeError> {
    let overrides: Vec<String> = overrides.iter().map(|o| (*o).to_owned()).collect();
    Recipe::from_text(Path::new("recipe.yaml"), text.to_owned(), &overrides)
}

fn render(error: &RecipeError) -> String {
    let mut out = String::new();
    GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor())
        .with_width(80)
        .render_report(&mut out, error)
        .expect("rendering to a string cannot fail");
    out
}

fn problem(text: &str, overrides: &[&str]) -> (ProblemKind, usize, usize, String) {
    let error = load(text, overrides).expect_err("the recipe is invalid");
    let [problem] = error.problems() else {
        panic!("expected one problem, got {:?}", error.problems());
    };
    let span = problem.span.expect("located");
    // 1-based line and column, as editors show them.
    let before = &text[..span.offset().min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, str::len) + 1;
    (problem.kind, line, column, render(&error))
}

#[test]
fn syntax_error_points_at_the_line() {
    let (kind, line, _, rendered) = problem("name: demo\nseed: [1, 2\nworkdir: x\n", &[]);
    assert_eq!(kind, ProblemKind::Syntax);
    assert_eq!(line, 3);
    insta::assert_snapshot!(rendered);
}

#[test]
fn unknown_top_level_key_suggests_the_nearest() {
    let (kind, line, column, rendered) = problem("name: demo\nsede: 3\n", &[]);
    assert_eq!((kind, line, column), (ProblemKind::UnknownKey, 2, 1));
    assert!(rendered.contains("did you mean `seed`?"), "{rendered}");
    insta::assert_snapshot!(rendered);
}

#[test]
fn wrong_type_points_at_the_value() {
    let (kind, line, column, rendered) = problem("name: demo\nseed: many\n", &[]);
    assert_eq!((kind, line, column), (ProblemKind::Type, 2, 7));
    insta::assert_snapshot!(rendered);
}

#[test]
fn unknown_enum_value_suggests_a_valid_one() {
    let (kind, line, column, rendered) = problem("accelerator: cudaa\n", &[]);
    assert_eq!((kind, line, column), (ProblemKind::Type, 1, 14));
    assert!(rendered.contains("did you mean `cuda`?"), "{rendered}");
}

#[test]
fn negative_number_gets_a_hint() {
    let (kind, _, _, rendered) = problem("seed: -4\n", &[]);
    assert_eq!(kind, ProblemKind::Type);
    assert!(rendered.contains("zero or more"), "{rendered}");
}

#[test]
fn a_recipe_without_stages_says_what_to_add() {
    let (kind, _, _, rendered) = problem("name: demo\n", &[]);
    assert_eq!(kind, ProblemKind::Value);
    assert!(rendered.contains("no stage section"), "{rendered}");
}

#[test]
fn a_bad_override_points_at_the_argument() {
    let error = load("name: demo\n", &["seed=many"]).expect_err("invalid");
    let rendered = render(&error);
    assert!(rendered.contains("--set"), "{rendered}");
    insta::assert_snapshot!(rendered);
    let error = load("name: demo\n", &["noequals"]).expect_err("invalid");
    assert_eq!(error.problems()[0].kind, ProblemKind::Override);
}

#[test]
fn several_problems_are_reported_together() {
    let error = load("nmae: demo\nsede: 3\n", &[]).expect_err("invalid");
    assert_eq!(error.problems().len(), 2);
    let rendered = render(&error);
    assert!(rendered.contains("has 2 problems"), "{rendered}");
}

#[test]
fn unknown_keys_and_bad_values_are_reported_together() {
    let error = load(
        "name: demo\nchunk:\n  input: docs\n  max_tokns: 100\ntrain:\n  epochs: -1\n",
        &[],
    )
    .expect_err("invalid");
    let kinds: Vec<ProblemKind> = error.problems().iter().map(|p| p.kind).collect();
    assert!(kinds.contains(&ProblemKind::UnknownKey), "{kinds:?}");
    assert!(
        kinds.iter().any(|k| *k != ProblemKind::UnknownKey),
        "{}",
        render(&error)
    );
}

#[test]
fn r18_1_long_line_diagnostic() {
    // A problem past column 65,535 panicked inside miette's renderer (format widths are u16).
    let long = format!("name: demo\n# {}\nsede: 3\n", "x".repeat(66_000));
    let (kind, line, _, rendered) = problem(&long, &[]);
    assert_eq!((kind, line), (ProblemKind::UnknownKey, 3));
    assert!(rendered.contains("sede"), "{rendered}");
    for text in [
        format!("name: demo\nseed: {}z\n", "9".repeat(66_000)),
        format!("name: demo\nseed: [{}\n", "1, ".repeat(30_000)),
        format!("{{a: 1, {} sede: 3}}\n", "b: 2, ".repeat(12_000)),
    ] {
        let error = load(&text, &[]).expect_err("invalid");
        let rendered = render(&error);
        assert!(rendered.lines().all(|l| l.len() < 1000), "{rendered}");
    }
    let set = format!("train.epochs={}", "9".repeat(70_000));
    let error = load("train: {}\n", &[&set]).expect_err("invalid");
    let _ = render(&error);
}

#[test]
fn r18_5_many_unknown_keys_are_reported_in_linear_time_and_capped() {
    let text: String = (0..16_000).map(|i| format!("unknown_{i}: 1\n")).collect();
    let started = std::time::Instant::now();
    let error = load(&text, &[]).expect_err("invalid");
    let rendered = render(&error);
    assert_eq!(error.problems().len(), super::error::MAX_PROBLEMS);
    let head = &rendered[..rendered.len().min(400)];
    assert!(
        head.contains("has 16000 problems; the first 20 are shown"),
        "{head}"
    );
    assert!(head.contains("15980"), "{head}");
    // 25 s before; generous for a debug build on a loaded machine.
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());

    let deep = format!("{}1{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let started = std::time::Instant::now();
    let error = load(&deep, &[]).expect_err("too deep");
    let _ = render(&error);
    let nested: String = (0..100_000)
        .map(|i| format!("{}k:\n", " ".repeat(i % 200)))
        .collect();
    let _ = load(&nested, &[]);
    let deep = format!("{}=1", vec!["a"; 100_000].join("."));
    let error = load("train: {}\n", &[&deep]).expect_err("invalid");
    assert!(render(&error).contains("100000 parts"));
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
}

#[test]
fn r18_16_non_string_from_items_are_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("docs")).expect("mkdir");
    let path = dir.path().join("recipe.yaml");
    let text = "chunk:\n  input: docs\nquery_gen:\n  strategies: [ict]\n  from: [chunk, 3, true]\n";
    let error = Recipe::from_text(&path, text.to_owned(), &[]).expect_err("invalid");
    let messages: Vec<&str> = error
        .problems()
        .iter()
        .map(|p| p.message.as_str())
        .collect();
    assert_eq!(
        messages,
        [
            "`query_gen.from.1`: expected a section name",
            "`query_gen.from.2`: expected a section name"
        ]
    );
}

#[test]
fn r18_16_from_naming_a_stage_that_produces_nothing_needed_names_the_fix() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("docs")).expect("mkdir");
    let path = dir.path().join("recipe.yaml");
    let text = "chunk:\n  input: docs\nquery_gen:\n  strategies: [ict]\njudge: {}\nmine:\n  from: [judge]\n";
    let recipe = Recipe::from_text(&path, text.to_owned(), &[]).expect("loads");
    let Err(error) = crate::plan::Dag::build(&recipe) else {
        panic!("mine reads chunks, which `judge` does not produce");
    };
    let missing = error
        .problems()
        .iter()
        .find(|p| p.kind == ProblemKind::MissingInput && p.message.contains("chunks"))
        .expect("the missing chunks are reported");
    assert_eq!(
        missing.message,
        "stage `mine` needs chunks, which none of the sections in its `from:` produces"
    );
    assert_eq!(missing.help.as_deref(), Some("add `chunk` to `mine.from`"));
}

/// YAML-ish text: keys, values, indentation, flow syntax and junk.
fn yamlish() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        Just("name: x\n".to_owned()),
        Just("seed: 3\n".to_owned()),
        Just("accelerator: cpu\n".to_owned()),
        Just("chunk:\n".to_owned()),
        Just("  max_tokens: 12\n".to_owned()),
        Just("train:\n  epochs: -1\n".to_owned()),
        Just("- item\n".to_owned()),
        Just("{a: [1, 2\n".to_owned()),
        Just("&anchor x: *anchor\n".to_owned()),
        Just("? complex\n: key\n".to_owned()),
        Just("\t\n".to_owned()),
        "[ -~]{0,20}\n",
        "\\PC{0,10}",
    ];
    prop::collection::vec(atom, 0..12).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}") {
        let _ = load(&text, &[]);
    }

    #[test]
    fn mutated_recipes_never_panic(text in yamlish(), set in prop::option::of("[a-z_.]{0,12}=[ -~]{0,8}")) {
        let overrides: Vec<&str> = set.iter().map(String::as_str).collect();
        if let Err(error) = load(&text, &overrides) {
            // Rendering must not panic either, and every problem has a message.
            let _ = render(&error);
            for problem in error.problems() {
                prop_assert!(!problem.message.is_empty());
            }
        }
    }
}

/// Every key path a `--set` can name: the top-level keys and each section's keys, from the schema.
fn schema_keys() -> Vec<String> {
    let schema = super::schema::recipe_schema();
    let definitions = schema["$defs"].clone();
    let mut keys = Vec::new();
    if let Some(properties) = schema["properties"].as_object() {
        for (key, section) in properties {
            keys.push(key.clone());
            let section = match section["$ref"].as_str() {
                Some(reference) => &definitions[reference.rsplit('/').next().unwrap_or_default()],
                None => section,
            };
            if let Some(inner) = section["properties"].as_object() {
                keys.extend(inner.keys().map(|k| format!("{key}.{k}")));
            }
        }
    }
    keys
}

/// Values a `--set` may carry, hostile ones included: huge and negative numbers, odd YAML, long
/// text.
fn set_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1".to_owned()),
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("1000000000000".to_owned()),
        Just("1e308".to_owned()),
        Just(".nan".to_owned()),
        Just("[1, 2]".to_owned()),
        Just("{a: 1}".to_owned()),
        Just("~".to_owned()),
        Just("''".to_owned()),
        "[ -~]{0,16}",
        "\\PC{0,8}",
        (60_000usize..70_000).prop_map(|n| "9".repeat(n)),
    ]
}

/// Recipe text: the YAML-ish mix, sometimes after a line longer than miette can render, or
/// after a flow mapping whose last key (often unknown) sits past column 65,535.
fn recipe_text() -> impl Strategy<Value = String> {
    let long = prop::option::weighted(0.2, (60_000usize..70_000, "[a-z_]{1,8}", any::<bool>()));
    (yamlish(), long).prop_map(|(text, long)| match long {
        Some((n, _, false)) => format!("# {}\n{text}", "x".repeat(n)),
        Some((n, key, true)) => format!("{{name: '{}', {key}: 1}}\n{text}", "x".repeat(n)),
        None => text,
    })
}

/// How long the fuzz target below runs: `RAGD_FUZZ_SECONDS`, else 4 s, so CI stays bounded.
fn fuzz_budget() -> std::time::Duration {
    let seconds = std::env::var("RAGD_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    std::time::Duration::from_secs_f64(seconds)
}

/// Issue 18's fuzz target: recipe text and `--set` arguments through loading, planning the DAG
/// and rendering every diagnostic, never panicking. It runs batches of cases until its time
/// budget is spent ([`fuzz_budget`]), so CI time stays bounded whatever a case costs; a failure
/// is shrunk and reported as proptest does.
#[test]
fn r18_fuzz_recipe_text_and_set_values_never_panic() {
    let sets = prop::collection::vec(
        (prop::sample::select(schema_keys()), set_value()).prop_map(|(k, v)| format!("{k}={v}")),
        0..3,
    );
    let strategy = (recipe_text(), sets);
    // What it found once: `overlap * 2` overflowed in the chunk section's check.
    let _ = load("", &["chunk.overlap=18446744073709551615"]);
    let started = std::time::Instant::now();
    let mut cases = 0;
    while started.elapsed() < fuzz_budget() {
        // A runner counts its cases over its lifetime: a fresh one (freshly seeded) per batch.
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 32,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let result = runner.run(&strategy, |(text, sets)| {
            let overrides: Vec<&str> = sets.iter().map(String::as_str).collect();
            let error = match load(&text, &overrides) {
                Ok(recipe) => match crate::plan::Dag::build(&recipe) {
                    Ok(_) => return Ok(()),
                    Err(error) => error,
                },
                Err(error) => error,
            };
            prop_assert!(!render(&error).is_empty());
            let mut json = String::new();
            prop_assert!(
                miette::JSONReportHandler::new()
                    .render_report(&mut json, &error)
                    .is_ok()
            );
            Ok(())
        });
        if let Err(failure) = result {
            panic!("{failure:?}");
        }
        cases += 32;
    }
    assert!(cases >= 32, "{cases} cases");
}

#[test]
fn encode_precision_is_f32_unless_the_recipe_or_a_set_asks_for_bf16() {
    use crate::model::encoder::EncodePrecision;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("docs")).expect("mkdir");
    let path = dir.path().join("recipe.yaml");
    let precision = |text: &str, overrides: &[String]| {
        Recipe::from_text(&path, text.to_owned(), overrides)
            .expect("loads")
            .env
            .encode_precision
    };
    let stages = "chunk:\n  input: docs\n";
    assert_eq!(precision(stages, &[]), EncodePrecision::F32);
    let bf16 = format!("encode_precision: bf16\n{stages}");
    assert_eq!(precision(&bf16, &[]), EncodePrecision::Bf16);
    let set = ["encode_precision=bf16".to_owned()];
    assert_eq!(precision(stages, &set), EncodePrecision::Bf16);
    let (kind, line, _, _) = problem("encode_precision: int8\nchunk:\n  input: docs\n", &[]);
    assert_eq!((kind, line), (ProblemKind::Type, 1));
}
