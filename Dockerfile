# meshd, meshctl and the CNI plugin meshd-cni in a small runtime image (Debian's slim base, the
# binaries, their man pages, and nft for a gateway's masquerade):
#   docker build --build-arg MESH_GIT_COMMIT="$(git rev-parse --short=12 HEAD)" -t meshd:0.1.0 .
# deploy/kubernetes runs it as a DaemonSet.

FROM rust:1-bookworm AS build
ARG MESH_GIT_COMMIT=unknown
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY build-support build-support
COPY proto proto
COPY policy policy
COPY keyfile keyfile
COPY meshd meshd
COPY meshctl meshctl
COPY cni cni
COPY tests tests
COPY bench bench
RUN cargo build --release --locked -p meshd -p meshctl -p meshd-cni \
 && install -D -m 0755 target/release/meshd /out/usr/local/bin/meshd \
 && install -D -m 0755 target/release/meshd-cni /out/usr/local/bin/meshd-cni \
 && install -D -m 0755 target/release/meshctl /out/usr/local/bin/meshctl \
 && target/release/meshctl man --out /out/usr/local/share/man/man1 \
 && mkdir -p /out/usr/local/share/man/man8 \
 && target/release/meshd --man > /out/usr/local/share/man/man8/meshd.8 \
 && mkdir -p /out/usr/share/bash-completion/completions \
 && target/release/meshctl completion bash > /out/usr/share/bash-completion/completions/meshctl

FROM debian:bookworm-slim
# Debian stable's own packages, updated in place by its security archive: not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
# meshd needs CAP_NET_ADMIN for the TUN device, addresses and routes; the DaemonSet gives the
# container that one capability and meshd drops every other itself. Running it as a user other
# than root would need file capabilities and privilege escalation allowed, which is worse.
# hadolint ignore=DL3002
USER 0:0
EXPOSE 51820/udp 9469/tcp
ENTRYPOINT ["/usr/local/bin/meshd"]
CMD ["--foreground", "--config", "/etc/meshd/meshd.toml"]
