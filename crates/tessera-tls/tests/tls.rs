//! A real HTTPS server on loopback with a private CA from `init`: clients that trust the CA
//! get through, others are refused; the certificate is replaced without a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use tessera_tls::{ServerTls, TlsListener};

async fn serve(tls: &std::sync::Arc<ServerTls>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = TlsListener::new(listener, tls.acceptor().unwrap()).unwrap();
    let router = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("https://127.0.0.1:{port}/hello")
}

async fn get(url: &str, ca: Option<&Path>) -> Result<String, String> {
    let client = tessera_tls::client_builder(ca)
        .unwrap()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let answer = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
    answer.text().await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_private_ca_serves_https_to_clients_that_trust_it_and_the_certificate_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let written = tessera_tls::init(&site, &names).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&written.key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is its owner's only");
    }
    let tls = ServerTls::load(&written.cert, &written.key).unwrap();
    let url = serve(&tls).await;
    assert_eq!(get(&url, Some(&written.ca)).await.unwrap(), "hello");
    // Not trusting the CA: refused (the system roots do not know it).
    let refused = get(&url, None).await.unwrap_err();
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    // Plain HTTP to the TLS port gets no answer.
    let plain = url.replace("https://", "http://");
    assert!(get(&plain, None).await.is_err());

    // A new certificate from another CA, copied over the files: served without a restart.
    let other = tessera_tls::init(&dir.path().join("other"), &names).unwrap();
    std::fs::copy(&other.key, &written.key).unwrap();
    std::fs::copy(&other.cert, &written.cert).unwrap();
    assert!(tls.reload(true));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if get(&url, Some(&other.ca)).await.as_deref() == Ok("hello") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        get(&url, Some(&written.ca)).await.is_err(),
        "the old CA no longer fits"
    );
}

#[test]
fn a_key_that_does_not_match_is_refused_and_the_current_pair_kept() {
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["localhost".to_string()];
    let one = tessera_tls::init(&dir.path().join("one"), &names).unwrap();
    let two = tessera_tls::init(&dir.path().join("two"), &names).unwrap();
    let error = ServerTls::load(&one.cert, &two.key).unwrap_err();
    assert!(error.to_string().contains("does not match"), "{error}");
    let tls = ServerTls::load(&one.cert, &one.key).unwrap();
    std::fs::copy(&two.key, &one.key).unwrap();
    assert!(!tls.reload(true), "a mismatched pair is not taken");
    let error = tessera_tls::init(&dir.path().join("none"), &[]).unwrap_err();
    assert!(error.to_string().contains("--name"), "{error}");
}

/// Serves `/who`, answering whether the connection showed a verified client certificate;
/// the listener asks for certificates from `ca` (mutual TLS, as between domain hosts).
async fn serve_peers(tls: &std::sync::Arc<ServerTls>, ca: &Path) -> String {
    use axum::extract::ConnectInfo;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener =
        TlsListener::new(listener, tls.acceptor_asking_certificates(ca).unwrap()).unwrap();
    let router = axum::Router::new().route(
        "/who",
        axum::routing::get(
            |ConnectInfo(client): ConnectInfo<tessera_tls::Client>| async move {
                if client.certified {
                    "peer"
                } else {
                    "anonymous"
                }
            },
        ),
    );
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<tessera_tls::Client>(),
        )
        .await
    });
    format!("https://127.0.0.1:{port}/who")
}

/// A GET with the peers' client configuration (pins, CA, own certificate).
async fn get_as_peer(
    url: &str,
    config: tessera_tls::rustls::ClientConfig,
) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let answer = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
    answer.text().await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn peers_trust_a_pinned_certificate_or_their_ca_and_show_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let one = tessera_tls::init_as(&site, &names, "host-1").unwrap();
    let two = tessera_tls::init_as(&site, &names, "host-2").unwrap();
    assert_eq!(one.ca, two.ca, "both hosts' certificates come from one CA");
    let outside = tessera_tls::init(&dir.path().join("outside"), &names).unwrap();
    let server = ServerTls::load(&one.cert, &one.key).unwrap();
    let url = serve_peers(&server, &one.ca).await;
    let pin = |path: &Path| {
        tessera_tls::parse_pin(&tessera_tls::fingerprint_file(path).unwrap()).unwrap()
    };
    let host_2 = ServerTls::load(&two.cert, &two.key).unwrap();

    // The domain's CA, host 2's certificate shown: a peer.
    let config = tessera_tls::peer_client_config(Some(&one.ca), &[], Some(host_2.clone())).unwrap();
    assert_eq!(get_as_peer(&url, config).await.unwrap(), "peer");
    // No certificate shown: served, but not as a peer.
    let config = tessera_tls::peer_client_config(Some(&one.ca), &[], None).unwrap();
    assert_eq!(get_as_peer(&url, config).await.unwrap(), "anonymous");
    // A certificate of another CA: the handshake fails.
    let stranger = ServerTls::load(&outside.cert, &outside.key).unwrap();
    let config = tessera_tls::peer_client_config(Some(&one.ca), &[], Some(stranger)).unwrap();
    assert!(get_as_peer(&url, config).await.is_err());
    // Trusting another CA: the server is not believed.
    let config = tessera_tls::peer_client_config(Some(&outside.ca), &[], None).unwrap();
    assert!(get_as_peer(&url, config).await.is_err());

    // Pinned: host 1's own certificate, no CA needed; the pin of another certificate (host
    // 2's, from the same CA) is refused.
    let config = tessera_tls::peer_client_config(None, &[pin(&one.cert)], None).unwrap();
    assert_eq!(get_as_peer(&url, config).await.unwrap(), "anonymous");
    let config = tessera_tls::peer_client_config(None, &[pin(&two.cert)], None).unwrap();
    let refused = get_as_peer(&url, config).await.unwrap_err();
    assert!(refused.contains("peer_pins"), "{refused}");
    // Pin and CA both: both must hold.
    let config =
        tessera_tls::peer_client_config(Some(&outside.ca), &[pin(&one.cert)], None).unwrap();
    assert!(get_as_peer(&url, config).await.is_err());
    let config =
        tessera_tls::peer_client_config(Some(&one.ca), &[pin(&one.cert)], Some(host_2)).unwrap();
    assert_eq!(get_as_peer(&url, config).await.unwrap(), "peer");
}

#[test]
fn pins_parse_as_openssl_prints_them_and_bad_ones_are_named() {
    let hex = "ab".repeat(32);
    let colons = vec!["AB"; 32].join(":");
    assert_eq!(tessera_tls::parse_pin(&hex).unwrap(), [0xab; 32]);
    assert_eq!(
        tessera_tls::parse_pin(&format!("sha256:{hex}")).unwrap(),
        [0xab; 32]
    );
    assert_eq!(tessera_tls::parse_pin(&colons).unwrap(), [0xab; 32]);
    assert!(
        tessera_tls::parse_pin("xyz")
            .unwrap_err()
            .contains("not hex")
    );
    assert!(
        tessera_tls::parse_pin("abcd")
            .unwrap_err()
            .contains("32 bytes")
    );
}
