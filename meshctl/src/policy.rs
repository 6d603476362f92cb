//! `meshctl policy`: what-if tools for the policy language (more to come: apply, diff, check).

use crate::Failure;
use anyhow::anyhow;
use policy::Selector;
use std::collections::BTreeMap;

/// `meshctl policy selector EXPR --labels K=V,...`: prints `true` or `false`.
pub fn selector(expr: &str, labels: &str) -> Result<(), Failure> {
    let sel = Selector::parse(expr).map_err(|e| {
        let pointer = format!("{}^", " ".repeat(e.column.saturating_sub(1)));
        Failure::input(anyhow!("selector: {e}\n  {expr}\n  {pointer}"))
    })?;
    let mut map = BTreeMap::new();
    for pair in labels.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| Failure::input(anyhow!("--labels: `{pair}` is not KEY=VALUE")))?;
        map.insert(k.trim().to_string(), v.trim().to_string());
    }
    println!("{}", sel.matches(&map));
    Ok(())
}
