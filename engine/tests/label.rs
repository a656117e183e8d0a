//! Labels and patterns: parsing, printing, matching.

use proptest::prelude::*;
use strata_engine::label::package_within;
use strata_engine::{Label, LabelError, Pattern};

fn label(s: &str) -> Label {
    s.parse().unwrap()
}

#[test]
fn parse_and_print() {
    for text in ["//a:b", "//:root", "//a/b-c/d.e:x+y_z.1", "//a:-"] {
        assert_eq!(label(text).to_string(), text);
    }
    let l = Label::parse(":x", Some("pkg/sub")).unwrap();
    assert_eq!((l.package(), l.name()), ("pkg/sub", "x"));
    assert_eq!(Label::parse(":x", Some("")).unwrap().to_string(), "//:x");
    assert_eq!(Label::new("a/b", "c").unwrap(), label("//a/b:c"));
}

#[test]
fn refusals_say_what_to_write() {
    let err = |s: &str| Label::parse(s, None).unwrap_err();
    assert_eq!(err("a:b"), LabelError::NoPrefix("a:b".into()));
    assert_eq!(
        err("//a").to_string(),
        "Label `//a` has no target name; write `//a:NAME` (or `//a:all` for every task)"
    );
    assert!(matches!(err("//a/../b:c"), LabelError::BadPackage { .. }));
    assert!(matches!(err("///a:b"), LabelError::BadPackage { .. }));
    assert!(matches!(err("//a/./b:c"), LabelError::BadPackage { .. }));
    assert!(matches!(err("//a b:c"), LabelError::BadPackage { .. }));
    assert!(matches!(err("//a:b/c"), LabelError::BadName { .. }));
    assert!(matches!(err("//a:..."), LabelError::BadName { .. }));
    assert!(matches!(err("//a:"), LabelError::BadName { .. }));
    assert_eq!(err("//a:all"), LabelError::IsPattern("//a:all".into()));
    assert_eq!(err("//..."), LabelError::IsPattern("//...".into()));
    assert_eq!(err(":x"), LabelError::NoCurrentPackage("x".into()));
    assert_eq!(
        Label::new("a", "all").unwrap_err(),
        LabelError::ReservedName
    );
    assert!(Label::new("/a", "b").is_err());
}

#[test]
fn patterns() {
    let p = |s: &str| s.parse::<Pattern>().unwrap();
    assert_eq!(p("//..."), Pattern::Recursive(String::new()));
    assert_eq!(p("//a/b/..."), Pattern::Recursive("a/b".into()));
    assert_eq!(p("//a:all"), Pattern::Package("a".into()));
    assert_eq!(p("//:all"), Pattern::Package(String::new()));
    assert_eq!(
        Pattern::parse(":all", Some("x")).unwrap(),
        Pattern::Package("x".into())
    );
    assert_eq!(p("//a:b"), Pattern::Target(label("//a:b")));
    for text in ["//...", "//a/b/...", "//a:all", "//:all", "//a:b"] {
        assert_eq!(p(text).to_string(), text);
    }
    assert!("//a/../...".parse::<Pattern>().is_err());
    assert!("//.../...".parse::<Pattern>().is_err());

    assert!(p("//...").matches(&label("//:x")));
    assert!(p("//a/...").matches(&label("//a:x")));
    assert!(p("//a/...").matches(&label("//a/b:x")));
    assert!(
        !p("//a/...").matches(&label("//ab:x")),
        "prefix of a name is not a parent"
    );
    assert!(!p("//a/...").matches(&label("//:x")));
    assert!(p("//a:all").matches(&label("//a:x")));
    assert!(!p("//a:all").matches(&label("//a/b:x")));
    assert!(package_within("a/b", "a") && !package_within("a-b", "a") && package_within("x", ""));
}

#[test]
fn order_groups_packages() {
    let mut labels = [
        label("//b:a"),
        label("//a:z"),
        label("//a:b"),
        label("//:z"),
    ];
    labels.sort();
    let shown: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    assert_eq!(shown, ["//:z", "//a:b", "//a:z", "//b:a"]);
}

#[test]
fn serde_is_the_string_form() {
    assert_eq!(serde_json::to_string(&label("//a:b")).unwrap(), "\"//a:b\"");
    assert_eq!(
        serde_json::from_str::<Label>("\"//a:b\"").unwrap(),
        label("//a:b")
    );
    assert!(serde_json::from_str::<Label>("\"//a:all\"").is_err());
}

proptest! {
    /// Any text is refused or parsed, never a panic; what parses prints back the same.
    #[test]
    fn parse_never_panics_and_round_trips(text in "[/:a-z.+_ -]{0,16}", current in proptest::option::of("[a-z/.]{0,6}")) {
        if let Ok(l) = Label::parse(&text, current.as_deref()) {
            prop_assert_eq!(Label::parse(&l.to_string(), None), Ok(l.clone()));
        }
        if let Ok(p) = Pattern::parse(&text, current.as_deref()) {
            prop_assert_eq!(Pattern::parse(&p.to_string(), None), Ok(p));
        }
    }

    #[test]
    fn valid_parts_always_parse(package in "([a-z0-9_-]{1,4}(/[a-z0-9_-]{1,4}){0,3})?", name in "[a-zA-Z0-9_+-][a-zA-Z0-9._+-]{0,8}") {
        prop_assume!(name != "all");
        let l = Label::new(package.clone(), name.clone()).unwrap();
        prop_assert_eq!(l.to_string(), format!("//{package}:{name}"));
    }
}
