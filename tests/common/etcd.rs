//! A real single-node etcd on loopback for the fleet tests and the fleet bench (Debian's
//! `etcd-server`; `.ci/run` installs it), and a TCP proxy that can cut one daemon off
//! from it (a partition of that host alone).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{free_port, http_request, tool_available, wait_for};

/// Whether `program` runs (`program arg` exits 0).
fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn etcd_installed() -> bool {
    runs("etcd", "--version")
}

/// Whether the fleet test `test` can run: etcd installed, else SKIP (or fail under CI).
pub fn need_etcd(test: &str) -> bool {
    tool_available(etcd_installed(), test, "etcd (Debian etcd-server)")
}

/// Whether a TLS fleet test can run: etcd and openssl installed, else SKIP (or fail under CI).
pub fn need_etcd_tls(test: &str) -> bool {
    need_etcd(test) && tool_available(runs("openssl", "version"), test, "openssl")
}

/// A test CA and the certificates signed by it, made with the openssl command (P-256
/// keys, PKCS#8 PEM, valid two days), plus a second CA that signed nothing of etcd's.
pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

impl Certs {
    pub fn make(dir: &Path) -> Certs {
        std::fs::create_dir_all(dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let mut args = vec!["req", "-x509"];
            args.extend(key);
            let (keyout, out, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=rollbackd-test-{ca}"),
            );
            args.extend([
                "-keyout", &keyout, "-out", &out, "-days", "2", "-subj", &subj,
            ]);
            openssl(&args);
        }
        // The server certificate is a client one too: etcd's JSON gateway dials etcd's
        // own TLS port with it, which --client-cert-auth checks.
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            let (keyout, csr, pem, extfile, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.ext"),
                format!("/CN={name}"),
            );
            let mut args = vec!["req"];
            args.extend(key);
            args.extend(["-keyout", &keyout, "-out", &csr, "-subj", &subj]);
            openssl(&args);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ]);
        }
        Certs {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
        }
    }
}

/// One etcd server, killed when dropped.
pub struct Etcd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
    /// With TLS: a second client port, `https://` (with `--client-cert-auth` when the
    /// flag is set; the plain one stays for the tests' own reads and writes).
    tls: Option<(u16, PathBuf, PathBuf, PathBuf, bool)>,
    /// With etcd's auth enabled ([`Etcd::enable_auth`]): root's token for the tests' own
    /// reads and writes.
    token: Mutex<Option<String>>,
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            dir: dir.to_path_buf(),
            client_port: free_port(),
            peer_port: free_port(),
            tls: None,
            token: Mutex::new(None),
        };
        etcd.spawn();
        etcd
    }

    /// An etcd that also serves `https://` ([`Etcd::tls_url`]) with `certs`' server
    /// certificate and asks every client there for a certificate signed by `certs.ca`.
    pub fn start_tls(dir: &Path, certs: &Certs) -> Etcd {
        Etcd::start_https(dir, certs, true)
    }

    /// [`Etcd::start_tls`], with `client_cert_auth` saying whether etcd asks for client
    /// certificates on its `https://` port.
    pub fn start_https(dir: &Path, certs: &Certs, client_cert_auth: bool) -> Etcd {
        let mut etcd = Etcd {
            child: None,
            dir: dir.to_path_buf(),
            client_port: free_port(),
            peer_port: free_port(),
            tls: Some((
                free_port(),
                certs.server_cert.clone(),
                certs.server_key.clone(),
                certs.ca.clone(),
                client_cert_auth,
            )),
            token: Mutex::new(None),
        };
        etcd.spawn();
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn tls_url(&self) -> String {
        let (port, ..) = self.tls.as_ref().expect("started with start_tls");
        format!("https://127.0.0.1:{port}")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        let mut command = Command::new("etcd");
        match &self.tls {
            None => {
                command
                    .arg(format!("--listen-client-urls={client}"))
                    .arg(format!("--advertise-client-urls={client}"));
            }
            Some((port, cert, key, ca, client_cert_auth)) => {
                let tls = format!("https://127.0.0.1:{port}");
                command
                    .arg(format!("--listen-client-urls={client},{tls}"))
                    .arg(format!("--advertise-client-urls={tls}"))
                    .arg(format!("--cert-file={}", cert.display()))
                    .arg(format!("--key-file={}", key.display()));
                // etcd asks for client certificates whenever it has a CA to check them by.
                if *client_cert_auth {
                    command
                        .arg(format!("--trusted-ca-file={}", ca.display()))
                        .arg("--client-cert-auth");
                }
            }
        }
        let child = command
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let ready = wait_for(Duration::from_secs(20), || {
            http_request("GET", addr, "/health")
                .is_ok_and(|r| r.status == 200 && r.body.contains("true"))
        });
        assert!(
            ready.is_some(),
            "etcd did not become healthy; its log:\n{}",
            self.log()
        );
    }

    /// kill -9 (the data directory stays).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        if self.token.lock().unwrap().is_some() {
            self.authenticate_root();
        }
    }

    /// A key's value through etcd's gateway (raw bytes), or `None`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({"key": b64.encode(key)}).to_string();
        let addr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let reply = self.request(addr, "/v3/kv/range", &body).ok()?;
        let value: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
        let kv = value["kvs"].as_array()?.first()?.clone();
        b64.decode(kv["value"].as_str()?).ok()
    }

    /// Deletes a key (with `prefix`, every key under it) through the gateway, as
    /// `etcdctl del` does.
    pub fn delete(&self, key: &str, prefix: bool) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut body = serde_json::json!({"key": b64.encode(key)});
        if prefix {
            let mut end = key.as_bytes().to_vec();
            *end.last_mut().unwrap() += 1;
            body["range_end"] = serde_json::Value::String(b64.encode(&end));
        }
        let addr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let reply = self
            .request(addr, "/v3/kv/deleterange", &body.to_string())
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    /// Writes many keys, 100 to a transaction (etcd takes at most 128 operations in one).
    pub fn put_many(&self, kvs: &[(String, Vec<u8>)]) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let addr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        for chunk in kvs.chunks(100) {
            let success: Vec<serde_json::Value> = chunk
                .iter()
                .map(|(key, value)| {
                    serde_json::json!({"request_put": {"key": b64.encode(key), "value": b64.encode(value)}})
                })
                .collect();
            let body = serde_json::json!({"success": success}).to_string();
            let reply = self.request(addr, "/v3/kv/txn", &body).unwrap();
            assert_eq!(reply.status, 200, "{}", reply.body);
        }
    }

    /// Writes a key through the gateway.
    pub fn put(&self, key: &str, value: &[u8]) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body =
            serde_json::json!({"key": b64.encode(key), "value": b64.encode(value)}).to_string();
        let addr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let reply = self.request(addr, "/v3/kv/put", &body).unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
}

impl Etcd {
    /// A POST to the plain client port, with root's token once auth is on.
    fn request(
        &self,
        addr: std::net::SocketAddr,
        path: &str,
        body: &str,
    ) -> std::io::Result<super::HttpResponse> {
        let token = self.token.lock().unwrap().clone();
        match token {
            Some(token) => {
                super::http_request_with("POST", addr, path, body, &[("authorization", &token)])
            }
            None => super::http_request_body("POST", addr, path, body),
        }
    }

    /// Turns etcd's auth on: `root` (password `root-pw`) and `user` with `password`,
    /// whose role may read and write only keys under `prefix`.
    pub fn enable_auth(&self, user: &str, password: &str, prefix: &str) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let addr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let steps = [
            ("/v3/auth/role/add", serde_json::json!({"name": "root"})),
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": "root", "password": "root-pw"}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": "root", "role": "root"}),
            ),
            ("/v3/auth/role/add", serde_json::json!({"name": "fleet"})),
            (
                "/v3/auth/role/grant",
                serde_json::json!({"name": "fleet", "perm": {"permType": "READWRITE", "key": b64.encode(prefix), "range_end": b64.encode(&end)}}),
            ),
            (
                "/v3/auth/user/add",
                serde_json::json!({"name": user, "password": password}),
            ),
            (
                "/v3/auth/user/grant",
                serde_json::json!({"user": user, "role": "fleet"}),
            ),
            ("/v3/auth/enable", serde_json::json!({})),
        ];
        for (path, body) in steps {
            let reply = super::http_request_body("POST", addr, path, &body.to_string()).unwrap();
            assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        }
        self.authenticate_root();
    }

    /// Changes `user`'s password as root (etcd then drops the user's tokens).
    pub fn change_password(&self, user: &str, password: &str) {
        let addr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let body = serde_json::json!({"name": user, "password": password}).to_string();
        let reply = self.request(addr, "/v3/auth/user/changepw", &body).unwrap();
        assert_eq!(reply.status, 200, "changepw: {}", reply.body);
    }

    /// A new token for root (etcd's simple tokens need not survive its restart).
    fn authenticate_root(&self) {
        let addr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        let reply = super::http_request_body(
            "POST",
            addr,
            "/v3/auth/authenticate",
            &serde_json::json!({"name": "root", "password": "root-pw"}).to_string(),
        )
        .unwrap();
        let token = serde_json::from_str::<serde_json::Value>(&reply.body).unwrap()["token"]
            .as_str()
            .expect("root's token")
            .to_owned();
        *self.token.lock().unwrap() = Some(token);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy to `target` on its own loopback port. `cut()` drops every connection
/// through it and leaves new ones hanging unanswered (a partition); `heal()` ends it.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (cut2, conns2) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                let Ok(client) = incoming else { continue };
                if cut2.load(Ordering::SeqCst) {
                    // Accepted and never answered: like packets dropped on the way.
                    conns2.lock().unwrap().push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut list = conns2.lock().unwrap();
                    list.push(client.try_clone().unwrap());
                    list.push(server.try_clone().unwrap());
                }
                let cut3 = cut2.clone();
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    cut3.clone(),
                );
                pipe(server, client, cut3);
            }
        });
        Proxy { port, cut, conns }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, cut: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
