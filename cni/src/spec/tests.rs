use super::*;

const CONF: &str =
    r#"{"cniVersion": "1.0.0", "name": "mesh", "type": "meshd-cni", "meshInterface": "mesh0"}"#;

#[test]
fn a_configuration_is_read_with_defaults_and_each_mistake_is_named() {
    let c = parse_conf(CONF.as_bytes()).unwrap();
    assert_eq!(
        (c.mesh_interface.as_str(), c.attach_wait_ms),
        ("mesh0", 10_000)
    );
    // What runtimes add is taken.
    let with_runtime = CONF.replace('}', r#", "prevResult": {"ips": []}, "runtimeConfig": {}}"#);
    assert!(parse_conf(with_runtime.as_bytes()).is_ok());
    let cases = [
        (
            CONF.replace("1.0.0", "0.2.0"),
            INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
        ),
        (
            CONF.replace("meshd-cni", "bridge"),
            INVALID_CONFIG,
            "wrong plugin type",
        ),
        (
            CONF.replace("mesh0", "mesh0; rm -rf /"),
            INVALID_CONFIG,
            "invalid meshInterface",
        ),
        (
            CONF.replace('}', r#", "meshInterfce": "x"}"#),
            DECODE_FAILURE,
            "not valid",
        ),
        (
            CONF.replace('}', r#", "ipam": {"type": "host-local"}}"#),
            INVALID_CONFIG,
            "ipam",
        ),
        (
            CONF.replace('}', r#", "attachWaitMs": 5}"#),
            INVALID_CONFIG,
            "attachWaitMs",
        ),
        ("{".to_string(), DECODE_FAILURE, "not valid"),
    ];
    for (text, code, msg) in cases {
        let e = parse_conf(text.as_bytes()).unwrap_err();
        assert_eq!(e.code, code, "{text}: {e:?}");
        assert!(e.msg.contains(msg), "{text}: {e:?}");
    }
    let big = vec![b' '; MAX_CONF_BYTES + 1];
    assert_eq!(parse_conf(&big).unwrap_err().code, DECODE_FAILURE);
    // The unknown key is named.
    let e = parse_conf(CONF.replace('}', r#", "meshInterfce": "x"}"#).as_bytes()).unwrap_err();
    assert!(e.details.contains("meshInterfce"), "{e:?}");
}

#[test]
fn the_pod_is_read_from_cni_args_and_a_missing_part_is_named() {
    let p = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=microblog;K8S_POD_NAME=post-1;K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_UID=u1").unwrap();
    assert_eq!(
        p,
        Pod {
            namespace: "microblog".into(),
            name: "post-1".into(),
            uid: "u1".into()
        }
    );
    let e = parse_args("K8S_POD_NAMESPACE=microblog;K8S_POD_NAME=post-1").unwrap_err();
    assert_eq!(e.code, INVALID_ENV);
    assert!(e.msg.contains("K8S_POD_UID"), "{e:?}");
    assert!(parse_args("K8S_POD_NAMESPACE").is_err());
    assert!(parse_args(&format!("K8S_POD_NAME={}", "x".repeat(254))).is_err());
}

#[test]
fn veth_names_are_stable_distinct_and_fit_an_interface_name() {
    let a = host_veth("c0ffee", "eth0");
    assert_eq!(a, host_veth("c0ffee", "eth0"));
    assert_ne!(a, host_veth("c0ffee", "eth1"));
    assert_ne!(a, host_veth("c0ffef", "eth0"));
    assert_eq!(a.len(), 15);
    assert!(check_ifname("veth", &a).is_ok());
}

#[test]
fn the_rules_drop_every_source_but_the_pod_s_and_are_removed_by_name() {
    let addrs: Vec<Cidr> = vec![
        "100.64.4.1/32".parse().unwrap(),
        "fd00::4:1/128".parse().unwrap(),
    ];
    let s = nft_install("msh0123456789ab", &addrs, "mesh0", true);
    assert!(s.contains("iifname vmap @pods"));
    // A pod's address from any other interface but the mesh's, a pod veth reached from anything
    // but the mesh interface, and a pod's traffic leaving elsewhere: dropped.
    assert!(
        s.contains(
            "prerouting iifname != @podifs iifname != \"mesh0\" ip saddr @pod4 counter drop"
        ),
        "{s}"
    );
    assert!(
        s.contains("forward oifname @podifs iifname != \"mesh0\" counter drop"),
        "{s}"
    );
    assert!(
        s.contains("forward iifname \"mesh0\" ip daddr @pod4 oifname != @podifs counter drop"),
        "{s}"
    );
    assert!(
        s.contains("add element inet meshd-cni pod4 { 100.64.4.1 }"),
        "{s}"
    );
    assert!(
        s.contains("add element inet meshd-cni pod6 { fd00::4:1 }"),
        "{s}"
    );
    assert!(s.contains("ip saddr != { 100.64.4.1 } counter drop"), "{s}");
    assert!(
        s.contains("ip6 saddr != { fd00::4:1, fe80::/10 } counter drop"),
        "{s}"
    );
    assert!(s.contains("\"msh0123456789ab\" : jump pod-msh0123456789ab"));
    // Without a new table, only the pod's chain and element; without IPv4, no IPv4 at all.
    let s = nft_install("msh0123456789ab", &addrs[1..], "mesh0", false);
    assert!(!s.contains("add table"));
    assert!(s.contains("meta nfproto ipv4 counter drop"), "{s}");
    let r = nft_remove("msh0123456789ab", &addrs);
    assert!(r.contains("delete element inet meshd-cni pod4 { 100.64.4.1 }"));
    assert!(r.contains("delete element inet meshd-cni pods { \"msh0123456789ab\" }"));
    assert!(r.contains("delete chain inet meshd-cni pod-msh0123456789ab"));
}

#[test]
fn results_follow_the_version_asked_for() {
    let addrs: Vec<Cidr> = vec!["100.64.4.1/32".parse().unwrap()];
    let r = add_result("1.0.0", "mshx", "eth0", "/var/run/netns/p", &addrs);
    assert_eq!(r["ips"][0]["address"], "100.64.4.1/32");
    assert_eq!(r["ips"][0]["interface"], 1);
    assert!(r["ips"][0].get("version").is_none());
    assert_eq!(r["interfaces"][1]["sandbox"], "/var/run/netns/p");
    assert_eq!(r["routes"], serde_json::json!([{"dst": "0.0.0.0/0"}]));
    let old = add_result("0.4.0", "mshx", "eth0", "/var/run/netns/p", &addrs);
    assert_eq!(old["ips"][0]["version"], "4");
    assert_eq!(version_result("1.0.0")["supportedVersions"][3], "1.0.0");
    let e = CniError::new(TRY_AGAIN_LATER, "meshd of mesh0 is not reachable", "x").to_json("0.4.0");
    assert_eq!(
        (e["code"].as_u64(), e["cniVersion"].as_str()),
        (Some(11), Some("0.4.0"))
    );
}
