//! After start-up meshd keeps only the capabilities it still needs: CAP_NET_ADMIN (fwmark on the
//! socket) and CAP_NET_BIND_SERVICE (a listen port below 1024 set later through the UAPI).
//! Everything else, from the permitted set and from the bounding set, is dropped for good.

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
