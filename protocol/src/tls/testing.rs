//! Certificates made in-process for tests (feature `test-pki`): a CA, and leaves it
//! signs, written as PEM files into a directory removed on drop. Never for deployment:
//! `scripts/make-certs.sh` makes those.

use std::path::{Path, PathBuf};

/// A test CA and the directory its files go to.
pub struct Pki {
    dir: PathBuf,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish()
    }
}

/// A certificate and key written as `NAME.pem` and `NAME.key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl Pki {
    /// A new CA called `tag`, its certificate in `ca.pem` of a fresh temporary directory.
    pub fn new(tag: &str) -> Pki {
        use std::sync::atomic::{AtomicU64, Ordering};
        // Unique per call: tests of one process run in parallel.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tidepool-pki-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test PKI directory");
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("tidepool test CA {tag}"));
        let key = rcgen::KeyPair::generate().expect("generate a CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("write ca.pem");
        Pki {
            dir,
            ca: rcgen::Issuer::new(params, key),
        }
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf for `names` (DNS names or IP addresses), valid from 1975 to 4096.
    pub fn leaf(&self, name: &str, names: &[&str]) -> Leaf {
        self.issue(name, names, false)
    }

    /// A leaf for `names` that expired in 2000.
    pub fn expired(&self, name: &str, names: &[&str]) -> Leaf {
        self.issue(name, names, true)
    }

    fn issue(&self, name: &str, names: &[&str], expired: bool) -> Leaf {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        if expired {
            params.not_before = rcgen::date_time_ymd(1999, 1, 1);
            params.not_after = rcgen::date_time_ymd(2000, 1, 1);
        }
        let key = rcgen::KeyPair::generate().expect("generate a leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("sign the leaf");
        let leaf = Leaf {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).expect("write the leaf certificate");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write the leaf key");
        leaf
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
