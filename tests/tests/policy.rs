//! The policy what-if tools from the operator's side.

use mesh_tests::bin;
use std::process::Command;

fn selector(expr: &str, labels: &str) -> (Option<i32>, String, String) {
    let o = Command::new(bin("meshctl"))
        .args(["policy", "selector", expr, "--labels", labels])
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn meshctl_policy_selector_prints_true_false_or_the_error_column() {
    assert_eq!(
        selector("svc-post == 'access'", "app=post,svc-post=access").1,
        "true\n"
    );
    assert_eq!(
        selector(
            "app == \"microblog\" && !has(debug)",
            "app=microblog,debug=1"
        )
        .1,
        "false\n"
    );
    assert_eq!(selector("tier not in {'db', 'cache'}", "").1, "true\n");
    let (code, out, err) = selector("app in {'a' 'b'}", "app=a");
    assert_eq!(code, Some(2));
    assert!(out.is_empty());
    assert!(err.contains("column 13"), "{err}");
    let (code, _, err) = selector("all()", "novalue");
    assert_eq!(code, Some(2));
    assert!(err.contains("`novalue` is not KEY=VALUE"), "{err}");
}
