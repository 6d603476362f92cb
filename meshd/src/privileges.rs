//! meshd keeps only the capabilities it needs: CAP_NET_ADMIN (the TUN device, addresses and
//! routes, fwmark on the socket) and CAP_NET_BIND_SERVICE (a listen port below 1024). Everything
//! else, from the permitted set and from the bounding set, is dropped for good, first thing, on
//! the only thread there is, so that no thread ever holds more. With those two alone (a non-root
//! user with ambient capabilities, as `deploy/systemd/meshd-mesh.service` shows) meshd runs the
//! same.

use caps::{CapSet, Capability, CapsHashSet};

pub fn drop_unneeded() -> Result<(), caps::errors::CapsError> {
    let keep: CapsHashSet = [Capability::CAP_NET_ADMIN, Capability::CAP_NET_BIND_SERVICE]
        .into_iter()
        .collect();
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    for cap in caps::all().difference(&keep) {
        // Needs CAP_SETPCAP, which we still hold here; without it (an unprivileged run) the bounding
        // set cannot change and the permitted set below is what protects us.
        let _ = caps::drop(None, CapSet::Bounding, *cap);
    }
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    Ok(())
}
