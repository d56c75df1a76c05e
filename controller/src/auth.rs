//! Who may call what.
//!
//! Clients present bearer tokens. A token has a role (viewer < submitter <
//! operator < admin, each including the ones before it) and a tenant scope:
//! one tenant, or `*` for all. Tokens are stored as SHA-256 digests of their
//! secret; the secret itself is shown once, when the token is created.
//!
//! Agents present the join token, and from their first registration on the
//! node secret the controller issued then: a node id is bound to the agent
//! that first registered it, and another agent holding only the join token
//! cannot take the id over.
//!
//! Nothing here knows tonic: adapters pass the `authorization` header's
//! value and map [`ControllerError`]s to statuses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use gpufleet_core::SharedClock;
use gpufleet_proto::v1::Role;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{ControllerError, Result};
use crate::store::{Keyspace, Store, WriteBatch, load_all};

/// Every token's text starts with this, so leaked tokens are easy to spot
/// (secret scanners) and easy to tell apart from join tokens.
pub const TOKEN_PREFIX: &str = "gft_";
/// Tenant scope of a token that acts for every tenant.
pub const ALL_TENANTS: &str = "*";
/// Key of the join token's digest in the settings keyspace.
const JOIN_TOKEN_KEY: &str = "join-token";

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// What a call does, for the role check. Tenant checks happen where the
/// tenant of the data is known (see [`Principal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Jobs, their logs and explanations (own tenant).
    ReadJobs,
    /// Submit and cancel jobs (own tenant).
    SubmitJobs,
    /// Usage records and reports (own tenant).
    ReadUsage,
    /// Nodes, capacity, telemetry and market signals (fleet-wide, no
    /// tenant data).
    ReadFleet,
    /// Cordon, drain, uncordon nodes and GPUs.
    OperateFleet,
    /// Create, list and revoke tokens; reset node identities.
    Administer,
    /// Ask who the token is.
    WhoAmI,
}

impl Action {
    fn min_role(self) -> Role {
        match self {
            Action::ReadJobs | Action::ReadUsage | Action::ReadFleet | Action::WhoAmI => {
                Role::Viewer
            }
            Action::SubmitJobs => Role::Submitter,
            Action::OperateFleet => Role::Operator,
            Action::Administer => Role::Admin,
        }
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Unspecified => "unspecified",
        Role::Viewer => "viewer",
        Role::Submitter => "submitter",
        Role::Operator => "operator",
        Role::Admin => "admin",
    }
}

/// A stored token. Only the digest of the secret is kept.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TokenRecord {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(enumeration = "Role", tag = "3")]
    pub role: i32,
    #[prost(string, tag = "4")]
    pub tenant: String,
    #[prost(bytes = "vec", tag = "5")]
    pub secret_sha256: Vec<u8>,
    #[prost(uint64, tag = "6")]
    pub created_unix: u64,
    /// 0: not revoked.
    #[prost(uint64, tag = "7")]
    pub revoked_unix: u64,
    /// 0: never expires.
    #[prost(uint64, tag = "8")]
    pub expires_unix: u64,
}

/// The digest of a node's secret, bound at its first registration.
#[derive(Clone, PartialEq, prost::Message)]
struct NodeBinding {
    #[prost(bytes = "vec", tag = "1")]
    secret_sha256: Vec<u8>,
    #[prost(uint64, tag = "2")]
    bound_unix: u64,
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    /// A tenant, or [`ALL_TENANTS`].
    pub tenant: String,
}

impl Principal {
    pub fn all_tenants(&self) -> bool {
        self.tenant == ALL_TENANTS
    }

    /// Refuses data of another tenant than the token's.
    pub fn check_tenant(&self, tenant: &str, what: &str) -> Result<()> {
        if self.all_tenants() || self.tenant == tenant {
            return Ok(());
        }
        Err(ControllerError::PermissionDenied(format!(
            "{what} belongs to tenant {tenant:?}; token {} ({}) is scoped to tenant {:?}",
            self.token_id, self.name, self.tenant
        )))
    }

    /// The tenant filter a listing runs with: a scoped token always gets its
    /// own tenant (an empty request means "mine"); asking for another
    /// tenant is refused rather than silently narrowed.
    pub fn tenant_filter(&self, requested: &str) -> Result<String> {
        if self.all_tenants() {
            return Ok(requested.to_string());
        }
        if requested.is_empty() || requested == self.tenant {
            return Ok(self.tenant.clone());
        }
        Err(ControllerError::PermissionDenied(format!(
            "tenant {requested:?} is not visible to token {} ({}), which is scoped to tenant {:?}",
            self.token_id, self.name, self.tenant
        )))
    }

    /// The tenant a submitted job is accounted to.
    pub fn submit_tenant(&self, requested: &str) -> Result<String> {
        if self.all_tenants() {
            return Ok(requested.to_string());
        }
        if requested.is_empty() || requested == self.tenant {
            return Ok(self.tenant.clone());
        }
        Err(ControllerError::PermissionDenied(format!(
            "spec.tenant: token {} ({}) may submit only for tenant {:?}, not {requested:?}",
            self.token_id, self.name, self.tenant
        )))
    }
}

/// Requests per second per token, with a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

pub struct Authority {
    tokens: RwLock<HashMap<String, TokenRecord>>,
    /// node id → digest of its secret.
    nodes: Mutex<HashMap<String, Vec<u8>>>,
    join_token_sha256: Vec<u8>,
    rate_limit: Option<RateLimit>,
    buckets: Mutex<HashMap<String, Bucket>>,
    random: SystemRandom,
    /// Token expiry, binding times and rate-limit refills.
    clock: SharedClock,
    /// Bumped at every revocation, so that open streams re-check their
    /// token at once instead of polling ([`Authority::revocations`]).
    revocations: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    digest(&SHA256, bytes).as_ref().to_vec()
}

/// Equal without an early exit. The inputs are digests, so timing would
/// reveal little anyway; this keeps it to nothing.
fn same_digest(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Token names: short and printable, so they are safe in logs and tables.
pub fn validate_token_name(name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(ControllerError::invalid(
            "name",
            format!("{name:?} is not a token name: use 1-64 letters, digits, '-', '_', '.' or '@'"),
        ))
    }
}

/// The outcome of a node's identity check (see [`Authority::check_node`]).
#[derive(Debug, Default)]
#[must_use = "a first registration's binding takes effect only through Authority::bound"]
pub struct NodeCheck {
    /// A first registration: the node id and its secret's digest.
    new_binding: Option<(String, Vec<u8>)>,
    issued_secret: Option<String>,
}

impl Authority {
    /// Loads tokens and node bindings from the store. `join_token` is the
    /// configured one; when empty, the token generated at the first start is
    /// used (see [`Authority::ensure_join_token`]).
    pub fn load(
        store: &dyn Store,
        join_token: &str,
        rate_limit: Option<RateLimit>,
        clock: SharedClock,
    ) -> Result<Self> {
        let tokens: Vec<TokenRecord> = load_all(store, Keyspace::Tokens)?;
        let mut nodes = HashMap::new();
        for (node_id, bytes) in store.scan_raw(Keyspace::NodeIdentities)? {
            let binding =
                <NodeBinding as prost::Message>::decode(bytes.as_slice()).map_err(|source| {
                    crate::store::StoreError::Corrupt {
                        key: format!("node identity {node_id}"),
                        source,
                    }
                })?;
            nodes.insert(node_id, binding.secret_sha256);
        }
        let join_token_sha256 = if join_token.is_empty() {
            let stored = store.scan_raw(Keyspace::Settings)?;
            stored
                .into_iter()
                .find(|(k, _)| k == JOIN_TOKEN_KEY)
                .map(|(_, v)| v)
                .unwrap_or_default()
        } else {
            sha256(join_token.as_bytes())
        };
        Ok(Self {
            tokens: RwLock::new(tokens.into_iter().map(|t| (t.id.clone(), t)).collect()),
            nodes: Mutex::new(nodes),
            join_token_sha256,
            rate_limit,
            buckets: Mutex::new(HashMap::new()),
            random: SystemRandom::new(),
            clock,
            revocations: tokio::sync::watch::channel(0).0,
        })
    }

    fn random_hex(&self, bytes: usize) -> Result<String> {
        let mut buf = vec![0u8; bytes];
        self.random
            .fill(&mut buf)
            .map_err(|_| ControllerError::Internal("the system random source failed".into()))?;
        Ok(hex(&buf))
    }

    fn read_tokens(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, TokenRecord>> {
        self.tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_tokens(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, TokenRecord>> {
        self.tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When no join token is configured or stored, makes one, stores its
    /// digest and writes it to `path` (mode 0600) for the admin to hand to
    /// agents. Returns the path when it wrote one.
    pub fn ensure_join_token(&mut self, store: &dyn Store, path: &Path) -> Result<Option<PathBuf>> {
        if !self.join_token_sha256.is_empty() {
            return Ok(None);
        }
        let token = format!("gfj_{}", self.random_hex(SECRET_BYTES)?);
        let digest = sha256(token.as_bytes());
        let mut batch = WriteBatch::default();
        batch.put_raw(Keyspace::Settings, JOIN_TOKEN_KEY, digest.clone());
        store.apply(batch)?;
        gpufleet_core::write_private_file(path, &token).map_err(|e| {
            ControllerError::Internal(format!(
                "cannot write the join token to {}: {e}",
                path.display()
            ))
        })?;
        self.join_token_sha256 = digest;
        Ok(Some(path.to_path_buf()))
    }

    /// On a first start (no tokens at all), creates an admin token for every
    /// tenant and writes it to `path` (mode 0600). Returns the path when it
    /// wrote one.
    pub fn bootstrap_admin(&self, store: &dyn Store, path: &Path) -> Result<Option<PathBuf>> {
        if !self.read_tokens().is_empty() {
            return Ok(None);
        }
        let (_, token) =
            self.create_token(store, "bootstrap-admin", Role::Admin, ALL_TENANTS, None)?;
        gpufleet_core::write_private_file(path, &token).map_err(|e| {
            ControllerError::Internal(format!(
                "cannot write the bootstrap admin token to {}: {e}",
                path.display()
            ))
        })?;
        Ok(Some(path.to_path_buf()))
    }

    /// Creates a token; returns its record and its text (shown once).
    pub fn create_token(
        &self,
        store: &dyn Store,
        name: &str,
        role: Role,
        tenant: &str,
        ttl: Option<Duration>,
    ) -> Result<(TokenRecord, String)> {
        validate_token_name(name)?;
        if role == Role::Unspecified {
            return Err(ControllerError::invalid(
                "role",
                "is required: viewer, submitter, operator or admin",
            ));
        }
        if tenant != ALL_TENANTS {
            crate::validate::tenant_name(tenant)?;
        }
        let id = self.random_hex(ID_BYTES)?;
        let secret = self.random_hex(SECRET_BYTES)?;
        let now = self.clock.unix_secs();
        let record = TokenRecord {
            id: id.clone(),
            name: name.to_string(),
            role: role as i32,
            tenant: tenant.to_string(),
            secret_sha256: sha256(secret.as_bytes()),
            created_unix: now,
            revoked_unix: 0,
            expires_unix: ttl.map_or(0, |t| now.saturating_add(t.as_secs().max(1))),
        };
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Tokens, &id, &record);
        store.apply(batch)?;
        self.write_tokens().insert(id.clone(), record.clone());
        Ok((record, format!("{TOKEN_PREFIX}{id}_{secret}")))
    }

    /// One token's record, revoked or not.
    pub fn token(&self, id: &str) -> Option<TokenRecord> {
        self.read_tokens().get(id).cloned()
    }

    /// Every token, newest first.
    pub fn list_tokens(&self, include_revoked: bool) -> Vec<TokenRecord> {
        let mut out: Vec<TokenRecord> = self
            .read_tokens()
            .values()
            .filter(|t| include_revoked || t.revoked_unix == 0)
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            b.created_unix
                .cmp(&a.created_unix)
                .then_with(|| a.id.cmp(&b.id))
        });
        out
    }

    /// Revokes a token. The last usable admin token cannot be revoked, so
    /// that the fleet is never left without anyone who can manage it.
    pub fn revoke_token(&self, store: &dyn Store, id: &str) -> Result<TokenRecord> {
        let mut tokens = self.write_tokens();
        let Some(record) = tokens.get(id).cloned() else {
            return Err(ControllerError::NotFound(format!(
                "no token with id {id:?}; `gpufleet tokens list` shows the ids"
            )));
        };
        if record.revoked_unix != 0 {
            return Ok(record);
        }
        let now = self.clock.unix_secs();
        let usable =
            |t: &TokenRecord| t.revoked_unix == 0 && (t.expires_unix == 0 || t.expires_unix > now);
        if record.role == Role::Admin as i32
            && usable(&record)
            && !tokens
                .values()
                .any(|t| t.id != id && t.role == Role::Admin as i32 && usable(t))
        {
            return Err(ControllerError::FailedPrecondition(format!(
                "token {id} is the last admin token; create another admin token before revoking it"
            )));
        }
        let mut revoked = record;
        revoked.revoked_unix = now.max(1);
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Tokens, id, &revoked);
        store.apply(batch)?;
        tokens.insert(id.to_string(), revoked.clone());
        drop(tokens);
        self.buckets_lock().remove(id);
        self.revocations.send_modify(|generation| *generation += 1);
        Ok(revoked)
    }

    /// Changes at every revocation; an open stream waits on it and then
    /// re-checks its token with [`Authority::check_still_valid`].
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// Whether a token authenticated earlier (by id) may still be used:
    /// `Unauthenticated` once it is revoked, expired or gone.
    pub fn check_still_valid(&self, token_id: &str) -> Result<()> {
        let tokens = self.read_tokens();
        let Some(record) = tokens.get(token_id) else {
            return Err(ControllerError::Unauthenticated(format!(
                "token {token_id} is no longer known to this controller"
            )));
        };
        self.usable(record)
    }

    /// How long until the token expires by this authority's clock; `None`
    /// for a token that never does (or is unknown).
    pub fn expires_in(&self, token_id: &str) -> Option<Duration> {
        let tokens = self.read_tokens();
        let expires = tokens.get(token_id)?.expires_unix;
        (expires != 0).then(|| Duration::from_secs(expires.saturating_sub(self.clock.unix_secs())))
    }

    /// Refuses a revoked or expired token.
    fn usable(&self, record: &TokenRecord) -> Result<()> {
        if record.revoked_unix != 0 {
            return Err(ControllerError::Unauthenticated(format!(
                "token {} ({}) was revoked",
                record.id, record.name
            )));
        }
        if record.expires_unix != 0 && record.expires_unix <= self.clock.unix_secs() {
            return Err(ControllerError::Unauthenticated(format!(
                "token {} ({}) has expired; create a new one",
                record.id, record.name
            )));
        }
        Ok(())
    }

    fn buckets_lock(&self) -> MutexGuard<'_, HashMap<String, Bucket>> {
        lock(&self.buckets)
    }

    /// The caller behind an `authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Principal> {
        let Some(header) = header else {
            return Err(ControllerError::Unauthenticated(
                "no token: send `authorization: Bearer <token>` (the CLI takes --token or GPUFLEET_TOKEN; a new controller writes an admin token to admin.token in its data dir)".into(),
            ));
        };
        let Some(text) = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
        else {
            return Err(ControllerError::Unauthenticated(
                "the authorization header must be `Bearer <token>`".into(),
            ));
        };
        let malformed = || {
            ControllerError::Unauthenticated(format!(
                "that is not a gpufleet token (they look like {TOKEN_PREFIX}<16 hex>_<64 hex>)"
            ))
        };
        let (id, secret) = text
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .ok_or_else(malformed)?;
        let tokens = self.read_tokens();
        let record = tokens
            .get(id)
            .filter(|r| same_digest(&r.secret_sha256, &sha256(secret.as_bytes())))
            .ok_or_else(|| {
                ControllerError::Unauthenticated(format!(
                    "token {TOKEN_PREFIX}{id}_… is not known to this controller"
                ))
            })?;
        self.usable(record)?;
        Ok(Principal {
            token_id: record.id.clone(),
            name: record.name.clone(),
            role: Role::try_from(record.role).unwrap_or(Role::Unspecified),
            tenant: record.tenant.clone(),
        })
    }

    /// Authenticates, checks the role and spends one request of the
    /// token's rate limit.
    pub fn authorize(&self, header: Option<&str>, action: Action) -> Result<Principal> {
        let principal = self.authenticate(header)?;
        let needed = action.min_role();
        if principal.role < needed {
            return Err(ControllerError::PermissionDenied(format!(
                "token {} ({}) has role {}; this call needs {} or above",
                principal.token_id,
                principal.name,
                role_name(principal.role),
                role_name(needed)
            )));
        }
        self.spend(&principal.token_id)?;
        Ok(principal)
    }

    fn spend(&self, token_id: &str) -> Result<()> {
        let Some(limit) = self.rate_limit else {
            return Ok(());
        };
        let now = self.clock.monotonic();
        let mut buckets = self.buckets_lock();
        let bucket = buckets.entry(token_id.to_string()).or_insert(Bucket {
            tokens: limit.burst,
            refilled: now,
        });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / limit.per_second;
        Err(ControllerError::ResourceExhausted(format!(
            "token {token_id} is over its rate limit (rate_limit_per_token) of {} requests/s (burst {}, rate_limit_burst); retry in {:.0} ms",
            limit.per_second,
            limit.burst,
            (wait * 1000.0).ceil()
        )))
    }

    /// Checks an agent's join token.
    pub fn check_join_token(&self, node_id: &str, presented: &str) -> Result<()> {
        if self.join_token_sha256.is_empty()
            || same_digest(&self.join_token_sha256, &sha256(presented.as_bytes()))
        {
            return Ok(());
        }
        Err(ControllerError::PermissionDenied(format!(
            "node {node_id}: the join token is wrong; configure the agent with the controller's join token (join_token, or join.token in the controller's data dir)"
        )))
    }

    /// Checks the node secret an agent presented, binding the node id on
    /// its first registration to the secret the agent generated (as k3s
    /// binds node passwords). An agent that presents none at its first
    /// registration is issued one: returned here, the agent must store it.
    pub fn bind_node(
        &self,
        store: &dyn Store,
        node_id: &str,
        presented: &str,
    ) -> Result<Option<String>> {
        let mut batch = WriteBatch::default();
        let check = self.check_node(&mut batch, node_id, presented)?;
        // Write first: an agent never holds a secret the store forgot.
        store.apply(batch)?;
        Ok(self.bound(check))
    }

    /// Checks the secret a node presents; a first registration's binding
    /// goes into `batch` (to be written with the node's record, one flush),
    /// and takes effect with [`Self::bound`] once the batch is written.
    pub fn check_node(
        &self,
        batch: &mut WriteBatch,
        node_id: &str,
        presented: &str,
    ) -> Result<NodeCheck> {
        let nodes = lock(&self.nodes);
        if let Some(digest) = nodes.get(node_id) {
            if same_digest(digest, &sha256(presented.as_bytes())) {
                return Ok(NodeCheck::default());
            }
            return Err(ControllerError::PermissionDenied(format!(
                "node id {node_id} is bound to another agent (its node secret does not match); if this host was reinstalled, an admin can run `gpufleet nodes reset-identity {node_id}`"
            )));
        }
        let secret = if presented.is_empty() {
            format!("gfn_{}", self.random_hex(SECRET_BYTES)?)
        } else if (16..=256).contains(&presented.len())
            && presented.bytes().all(|b| b.is_ascii_graphic())
        {
            presented.to_string()
        } else {
            return Err(ControllerError::invalid(
                "hello.node_secret",
                "must be 16-256 printable characters without spaces",
            ));
        };
        let binding = NodeBinding {
            secret_sha256: sha256(secret.as_bytes()),
            bound_unix: self.clock.unix_secs(),
        };
        batch.put(Keyspace::NodeIdentities, node_id, &binding);
        Ok(NodeCheck {
            new_binding: Some((node_id.to_string(), binding.secret_sha256)),
            issued_secret: presented.is_empty().then_some(secret),
        })
    }

    /// Makes a checked binding effective (its batch is written); returns
    /// the secret issued to an agent that brought none.
    pub fn bound(&self, check: NodeCheck) -> Option<String> {
        if let Some((node_id, digest)) = check.new_binding {
            lock(&self.nodes).insert(node_id, digest);
        }
        check.issued_secret
    }

    /// Forgets a node's binding; returns whether there was one.
    pub fn reset_node(&self, store: &dyn Store, node_id: &str) -> Result<bool> {
        let mut nodes = lock(&self.nodes);
        if !nodes.contains_key(node_id) {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        batch.delete(Keyspace::NodeIdentities, node_id);
        store.apply(batch)?;
        nodes.remove(node_id);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use gpufleet_core::{Clock as _, ManualClock, SystemClock};
    use std::sync::Arc;

    fn authority(limit: Option<RateLimit>) -> (tempfile::TempDir, SledStore, Authority) {
        let (dir, store, auth, _) = authority_on_clock(limit);
        (dir, store, auth)
    }

    /// An authority on virtual time, with its clock.
    fn authority_on_clock(
        limit: Option<RateLimit>,
    ) -> (tempfile::TempDir, SledStore, Authority, Arc<ManualClock>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let clock = Arc::new(ManualClock::at_unix_secs(1_800_000_000));
        let auth = Authority::load(&store, "", limit, clock.clone()).unwrap();
        (dir, store, auth, clock)
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn tokens_authenticate_by_role_and_survive_a_reload() {
        let (dir, store, auth) = authority(None);
        let (record, token) = auth
            .create_token(&store, "ci", Role::Submitter, "team-a", None)
            .unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert!(!record.secret_sha256.is_empty());
        let who = auth
            .authorize(Some(&bearer(&token)), Action::SubmitJobs)
            .unwrap();
        assert_eq!(who.tenant, "team-a");
        let err = auth
            .authorize(Some(&bearer(&token)), Action::OperateFleet)
            .unwrap_err();
        assert!(matches!(err, ControllerError::PermissionDenied(_)), "{err}");

        drop(auth);
        let again = Authority::load(&store, "", None, SystemClock::shared()).unwrap();
        assert_eq!(
            again.authenticate(Some(&bearer(&token))).unwrap().token_id,
            record.id
        );
        drop(dir);
    }

    #[test]
    fn wrong_missing_and_revoked_tokens_are_unauthenticated() {
        let (_dir, store, auth) = authority(None);
        let (_, admin) = auth
            .create_token(&store, "root", Role::Admin, ALL_TENANTS, None)
            .unwrap();
        let (record, token) = auth
            .create_token(&store, "ci", Role::Viewer, "a", None)
            .unwrap();
        for header in [
            None,
            Some("Basic abc".to_string()),
            Some(bearer("nope")),
            Some(bearer(&format!("{}x", token))),
        ] {
            let err = auth.authenticate(header.as_deref()).unwrap_err();
            assert!(matches!(err, ControllerError::Unauthenticated(_)), "{err}");
        }
        auth.revoke_token(&store, &record.id).unwrap();
        let err = auth.authenticate(Some(&bearer(&token))).unwrap_err();
        assert!(err.to_string().contains("revoked"), "{err}");
        assert!(auth.authenticate(Some(&bearer(&admin))).is_ok());
    }

    #[test]
    fn expired_tokens_are_unauthenticated() {
        let (_dir, store, auth, clock) = authority_on_clock(None);
        let (record, token) = auth
            .create_token(
                &store,
                "short-lived",
                Role::Viewer,
                "a",
                Some(Duration::from_secs(3600)),
            )
            .unwrap();
        assert_eq!(record.expires_unix, clock.unix_secs() + 3600);
        clock.advance(Duration::from_secs(3599));
        assert!(auth.authenticate(Some(&bearer(&token))).is_ok());
        clock.advance(Duration::from_secs(1));
        let err = auth.authenticate(Some(&bearer(&token))).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn a_revocation_is_announced_and_open_streams_can_recheck() {
        let (_dir, store, auth, clock) = authority_on_clock(None);
        let (_, _admin) = auth
            .create_token(&store, "root", Role::Admin, ALL_TENANTS, None)
            .unwrap();
        let (record, _) = auth
            .create_token(&store, "ci", Role::Viewer, "a", None)
            .unwrap();
        let (short, _) = auth
            .create_token(
                &store,
                "brief",
                Role::Viewer,
                "a",
                Some(Duration::from_secs(60)),
            )
            .unwrap();
        let revocations = auth.revocations();
        auth.check_still_valid(&record.id).unwrap();
        assert_eq!(auth.expires_in(&record.id), None);
        auth.revoke_token(&store, &record.id).unwrap();
        assert!(revocations.has_changed().unwrap());
        let err = auth.check_still_valid(&record.id).unwrap_err();
        assert!(matches!(err, ControllerError::Unauthenticated(_)), "{err}");
        assert!(err.to_string().contains("revoked"), "{err}");

        assert_eq!(auth.expires_in(&short.id), Some(Duration::from_secs(60)));
        clock.advance(Duration::from_secs(60));
        let err = auth.check_still_valid(&short.id).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(auth.check_still_valid("unknown").is_err());
    }

    #[test]
    fn the_last_admin_token_cannot_be_revoked() {
        let (dir, store, auth) = authority(None);
        let path = dir.path().join("admin.token");
        assert!(auth.bootstrap_admin(&store, &path).unwrap().is_some());
        assert!(auth.bootstrap_admin(&store, &path).unwrap().is_none());
        let text = std::fs::read_to_string(&path).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let who = auth.authenticate(Some(&bearer(text.trim()))).unwrap();
        assert_eq!(who.role, Role::Admin);
        let err = auth.revoke_token(&store, &who.token_id).unwrap_err();
        assert!(matches!(err, ControllerError::FailedPrecondition(_)));
        auth.create_token(&store, "second", Role::Admin, ALL_TENANTS, None)
            .unwrap();
        auth.revoke_token(&store, &who.token_id).unwrap();
    }

    #[test]
    fn tenant_scope() {
        let p = Principal {
            token_id: "x".into(),
            name: "n".into(),
            role: Role::Submitter,
            tenant: "a".into(),
        };
        assert_eq!(p.tenant_filter("").unwrap(), "a");
        assert!(p.tenant_filter("b").is_err());
        assert_eq!(p.submit_tenant("").unwrap(), "a");
        assert!(p.submit_tenant("b").is_err());
        assert!(p.check_tenant("b", "job j").is_err());
        let all = Principal {
            tenant: ALL_TENANTS.into(),
            ..p
        };
        assert_eq!(all.tenant_filter("").unwrap(), "");
        assert_eq!(all.submit_tenant("b").unwrap(), "b");
    }

    #[test]
    fn rate_limit_answers_resource_exhausted() {
        let (_dir, store, auth) = authority(Some(RateLimit {
            per_second: 0.001,
            burst: 3.0,
        }));
        let (_, token) = auth
            .create_token(&store, "ci", Role::Viewer, "a", None)
            .unwrap();
        for _ in 0..3 {
            auth.authorize(Some(&bearer(&token)), Action::ReadJobs)
                .unwrap();
        }
        let err = auth
            .authorize(Some(&bearer(&token)), Action::ReadJobs)
            .unwrap_err();
        assert!(
            matches!(err, ControllerError::ResourceExhausted(_)),
            "{err}"
        );
        assert!(err.to_string().contains("rate_limit_per_token"), "{err}");
    }

    #[test]
    fn node_ids_bind_to_their_first_agent() {
        let (_dir, store, auth) = authority(None);
        let secret = auth.bind_node(&store, "n1", "").unwrap().unwrap();
        assert!(auth.bind_node(&store, "n1", &secret).unwrap().is_none());
        // An agent that generated its own secret binds with it.
        assert!(
            auth.bind_node(&store, "n2", "agent-made-secret-0123")
                .unwrap()
                .is_none()
        );
        assert!(
            auth.bind_node(&store, "n2", "agent-made-secret-0123")
                .is_ok()
        );
        assert!(auth.bind_node(&store, "n2", "").is_err());
        assert!(auth.bind_node(&store, "n3", "short").is_err());
        let err = auth.bind_node(&store, "n1", "").unwrap_err();
        assert!(err.to_string().contains("reset-identity"), "{err}");
        let reloaded = Authority::load(&store, "", None, SystemClock::shared()).unwrap();
        assert!(reloaded.bind_node(&store, "n1", "guess").is_err());
        assert!(reloaded.reset_node(&store, "n1").unwrap());
        assert!(reloaded.bind_node(&store, "n1", "").unwrap().is_some());
    }

    #[test]
    fn generated_join_token_is_checked() {
        let (dir, store, mut auth) = authority(None);
        let path = dir.path().join("join.token");
        auth.ensure_join_token(&store, &path).unwrap();
        let token = std::fs::read_to_string(&path).unwrap();
        auth.check_join_token("n", token.trim()).unwrap();
        assert!(auth.check_join_token("n", "wrong").is_err());
        let reloaded = Authority::load(&store, "", None, SystemClock::shared()).unwrap();
        reloaded.check_join_token("n", token.trim()).unwrap();
        let configured = Authority::load(&store, "mine", None, SystemClock::shared()).unwrap();
        configured.check_join_token("n", "mine").unwrap();
        assert!(configured.check_join_token("n", token.trim()).is_err());
    }
}
