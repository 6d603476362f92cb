// Shared by meshd's and meshctl's build scripts (`include!`d): the git commit the binaries are
// built from, for `--version`: $MESH_GIT_COMMIT when set (an image build has no .git), else git's
// answer, or "unknown" outside a git checkout.
fn main() {
    println!("cargo:rerun-if-env-changed=MESH_GIT_COMMIT");
    let given = std::env::var("MESH_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty() && c != "unknown");
    let commit = given.or_else(|| {
        std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
    })
    .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MESH_GIT_COMMIT={commit}");
    // Only paths that exist: cargo runs a build script again every time for a missing one.
    println!("cargo:rerun-if-changed=build.rs");
    for path in ["../.git/HEAD", "../.git/refs", "../.git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
