//! Addresses and routes on our interface, through rtnetlink: the identity's overlay addresses on
//! the interface, and a route to each member's addresses through it.

use anyhow::{anyhow, Context};
use proto::Cidr;
use rtnetlink::RouteMessageBuilder;
use std::net::IpAddr;

pub struct Netlink {
    handle: rtnetlink::Handle,
    ifindex: u32,
}

impl Netlink {
    pub fn connect(ifname: &str) -> anyhow::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(anyhow!("interface {ifname} not found"));
        }
        Ok(Netlink { handle, ifindex })
    }

    pub async fn add_address(&self, cidr: Cidr) -> anyhow::Result<()> {
        self.handle
            .address()
            .add(self.ifindex, cidr.addr(), cidr.prefix_len())
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding address {cidr}"))
    }

    /// Removes `cidr` from the interface; an address already gone is not an error.
    pub async fn del_address(&self, cidr: Cidr) -> anyhow::Result<()> {
        use futures::TryStreamExt;
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.ifindex)
            .set_address_filter(cidr.addr())
            .set_prefix_length_filter(cidr.prefix_len())
            .execute();
        while let Some(msg) = found
            .try_next()
            .await
            .with_context(|| format!("looking up address {cidr}"))?
        {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .with_context(|| format!("removing address {cidr}"))?;
        }
        Ok(())
    }

    fn route(&self, cidr: Cidr) -> anyhow::Result<rtnetlink::packet_route::route::RouteMessage> {
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(cidr.addr(), cidr.prefix_len())
            .map_err(|e| anyhow!("route to {cidr}: {e:?}"))?
            .output_interface(self.ifindex)
            .build())
    }

    pub async fn add_route(&self, cidr: Cidr) -> anyhow::Result<()> {
        let msg = self.route(cidr)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding route {cidr}"))
    }

    pub async fn del_route(&self, cidr: Cidr) -> anyhow::Result<()> {
        let msg = self.route(cidr)?;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("removing route {cidr}"))
    }
}
