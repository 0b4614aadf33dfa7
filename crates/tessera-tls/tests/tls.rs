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
