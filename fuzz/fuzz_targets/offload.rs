//! Offloads: a super-packet and its virtio header as the TUN device hands them over (split), and
//! packets decrypted from peers as the coalescer reads them (the first bytes choose where one
//! packet ends and the next begins). Whatever joins must cut back into the packets it came from.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::offload::{split, Arena, Coalescer, VnetHdr, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(hdr) = VnetHdr::decode(data) {
        let mut out = Arena::new(1 << 17, 512);
        let mut resume = 0;
        while let Ok(false) = split(&hdr, &data[VNET_HDR_LEN..], &mut out, &mut resume) {
            out.clear();
        }
    }
    let mut arena = Arena::new(1 << 17, 64);
    let mut rest = data;
    while let [len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        if !arena.push(&tail[..n]) {
            break;
        }
        rest = &tail[n..];
    }
    let mut c = Coalescer::new(64, true);
    for i in 0..arena.len() {
        c.push(&arena, i);
    }
    c.finish(&mut arena);
    let members: usize = c.groups().iter().map(|g| c.members(g).count()).sum();
    assert_eq!(members, arena.len(), "every packet is written once");
});
