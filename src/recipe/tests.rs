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
