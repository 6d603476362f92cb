//! `genkey` and `pubkey`, byte-for-byte interchangeable with `wg genkey` and `wg pubkey`.

use crate::Failure;
use anyhow::{anyhow, Context};
use proto::Key;
use std::io::{Read, Write};

pub fn genkey() -> Result<(), Failure> {
    let key = Key::generate_private();
    writeln!(std::io::stdout(), "{key}").context("writing to stdout")?;
    Ok(())
}

pub fn pubkey() -> Result<(), Failure> {
    let mut text = String::new();
    std::io::stdin()
        .take(1024)
        .read_to_string(&mut text)
        .context("reading the private key from stdin")?;
    let key = Key::from_base64(&text)
        .map_err(|e| Failure::input(anyhow!("stdin does not hold a private key: {e}")))?;
    writeln!(std::io::stdout(), "{}", key.public()).context("writing to stdout")?;
    Ok(())
}
