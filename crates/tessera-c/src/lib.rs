//! libtessera: the Tessera SDK for C (and every language with a C FFI).
//!
//! The shape follows the incumbents' client libraries: one context per license
//! configuration (`tessera_init` with the vendor's public key compiled into the application
//! and the server list), `tessera_checkout` / `tessera_checkin`, an automatic heartbeat for
//! every lease held, and a callback for reconnecting, reconnected and lease lost. Every
//! lease is checked against the vendor's root key (`tessera_client::Client::verifying`):
//! a server that is not the vendor's cannot unlock the application.
//!
//! - **No global state**: each context owns its runtime (one worker thread, which also runs
//!   the heartbeats and calls the callback) and its last error; two contexts in one process
//!   do not share anything. A context may be used from several threads.
//! - **Errors**: a `TesseraStatus` code, and the message with `tessera_last_error`, kept per
//!   thread (like `errno`): valid until the next call on the same thread.
//! - **Memory**: the lease id is owned by the lease, valid until it is checked in.
//! - **Callbacks** run on the context's worker thread; calling `tessera_checkout` or
//!   `tessera_checkin` from inside one answers `TESSERA_STATUS_INVALID_ARGUMENT` (note the
//!   event, act on it from the application's own thread). No panic crosses the C boundary:
//!   an internal failure is `TESSERA_STATUS_REFUSED` with its message.
//!
//! The header `include/tessera.h` is generated from this file by cbindgen (`build.rs`).

use std::ffi::{CStr, CString, c_char, c_void};
use std::sync::{Arc, Mutex};

use tessera_client::blocking::{Client, Held};
use tessera_client::{BorrowStore, ClientError, GuardEvent};
use tessera_core::PublicKey;

/// What a call answered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraStatus {
    Ok = 0,
    /// A NULL or malformed argument (the vendor key, the server list, the component).
    InvalidArgument = 1,
    /// No server of the list could be reached.
    Unreachable = 2,
    /// Every license of the component is in use (`no_licenses_available`).
    NoLicenses = 3,
    /// No key on the server covers the component (`component_not_licensed`).
    NotLicensed = 4,
    /// The server granted a lease that does not check out against the vendor's key: the
    /// application must not run (`lease_untrusted`; the message names the check).
    Untrusted = 5,
    /// The lease is gone (returned, expired, or taken back by the administrator).
    LeaseLost = 6,
    /// Any other refusal by the server; the message carries its code.
    Refused = 7,
    /// The key does not allow borrowing, or not for that long (`borrow_not_allowed`).
    BorrowNotAllowed = 8,
}

/// What the callback is told.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TesseraEvent {
    /// A heartbeat could not reach any server; retrying (the lease holds until it expires).
    Reconnecting = 1,
    /// Heartbeats go through again.
    Reconnected = 2,
    /// The lease is lost: the application decides whether to save and exit.
    LeaseLost = 3,
}

/// Called on the context's worker thread with the event, the lease id, a message, and the
/// `user_data` given to `tessera_set_callback`.
pub type TesseraCallback = Option<
    unsafe extern "C" fn(
        event: TesseraEvent,
        lease_id: *const c_char,
        message: *const c_char,
        user_data: *mut c_void,
    ),
>;

/// `tessera_checkout` flag: when every license is in use, wait (up to 60 s, asking every
/// 2 s) for one to come free instead of answering `NO_LICENSES` at once.
pub const TESSERA_CHECKOUT_WAIT: u32 = 1;

struct Callback {
    function: TesseraCallback,
    user_data: usize,
}

/// One license configuration: vendor key, servers, runtime, callback, borrowings.
pub struct TesseraContext {
    client: Client,
    callback: Arc<Mutex<Callback>>,
}

/// A license held: a lease heartbeated in the background until it is checked in, or a
/// borrowing.
pub struct TesseraLease {
    held: Option<Held>,
    lease_id: CString,
}

thread_local! {
    /// The last error of a call on this thread (`tessera_last_error`, `tessera_init_error`).
    static LAST_ERROR: std::cell::RefCell<CString> = std::cell::RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    LAST_ERROR.with(|error| *error.borrow_mut() = c_string(message));
}

/// Runs an exported call: never from the SDK's own worker thread (a callback), and no panic
/// unwinds into C.
fn guarded(run: impl FnOnce() -> TesseraStatus) -> TesseraStatus {
    if tokio::runtime::Handle::try_current().is_ok() {
        set_last_error(
            "called from inside a Tessera callback: note the event there and act on it from the application's own thread".into(),
        );
        return TesseraStatus::InvalidArgument;
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(status) => status,
        Err(_) => {
            set_last_error("internal error in libtessera (a bug: please report it)".into());
            TesseraStatus::Refused
        }
    }
}

fn c_string(text: impl Into<String>) -> CString {
    let text: String = text.into();
    CString::new(text.replace('\0', " ")).unwrap_or_default()
}

/// # Safety
/// `text` is NULL or a NUL-terminated string.
unsafe fn read(text: *const c_char) -> Option<String> {
    if text.is_null() {
        return None;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    unsafe { CStr::from_ptr(text) }
        .to_str()
        .ok()
        .map(str::to_string)
}

fn fail_init(message: String) -> *mut TesseraContext {
    set_last_error(message);
    std::ptr::null_mut()
}

/// Creates a context. `vendor_public_key`: the vendor's Ed25519 public key, base64 (the
/// second line of `vendor.pub`), compiled into the application. `servers`: one URL or a
/// comma-separated list (`http://host1:7400,http://host2:7400`); NULL or empty reads
/// `TESSERA_SERVER`. Returns NULL on error: `tessera_init_error` says why.
///
/// # Safety
/// The arguments are NULL or NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_init(
    vendor_public_key: *const c_char,
    servers: *const c_char,
) -> *mut TesseraContext {
    // SAFETY: forwarded from the caller.
    let Some(key_text) = (unsafe { read(vendor_public_key) }) else {
        return fail_init("vendor_public_key is NULL or not UTF-8".into());
    };
    let root = match PublicKey::from_base64(key_text.trim()) {
        Ok(root) => root,
        Err(error) => return fail_init(format!("vendor_public_key: {error}")),
    };
    // SAFETY: forwarded from the caller.
    let servers = unsafe { read(servers) }
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::env::var("TESSERA_SERVER").ok())
        .filter(|s| !s.trim().is_empty());
    let Some(servers) = servers else {
        return fail_init("no server: pass a server list or set TESSERA_SERVER".into());
    };
    let client = match Client::new(root, Some(&servers)) {
        Ok(client) => client,
        Err(error) => return fail_init(error.to_string()),
    };
    let context = TesseraContext {
        client,
        callback: Arc::new(Mutex::new(Callback {
            function: None,
            user_data: 0,
        })),
    };
    Box::into_raw(Box::new(context))
}

/// Why the last `tessera_init` on this thread returned NULL.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_init_error() -> *const c_char {
    LAST_ERROR.with(|error| error.borrow().as_ptr())
}

/// Sets the callback for heartbeat events of this context's leases (NULL: none).
///
/// # Safety
/// `context` comes from `tessera_init`; `user_data` stays valid while leases are held.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_set_callback(
    context: *mut TesseraContext,
    callback: TesseraCallback,
    user_data: *mut c_void,
) {
    // SAFETY: the caller passes a live context.
    let Some(context) = (unsafe { context.as_ref() }) else {
        return;
    };
    let mut slot = context.callback.lock().unwrap_or_else(|e| e.into_inner());
    slot.function = callback;
    slot.user_data = user_data as usize;
}

impl TesseraContext {
    fn fail(&self, status: TesseraStatus, message: String) -> TesseraStatus {
        set_last_error(message);
        status
    }

    fn fail_with(&self, error: &ClientError) -> TesseraStatus {
        let status = match error {
            ClientError::Transport { .. } => TesseraStatus::Unreachable,
            ClientError::Untrusted { .. } => TesseraStatus::Untrusted,
            ClientError::Decode { .. } => TesseraStatus::Refused,
            ClientError::Invalid { .. } => TesseraStatus::InvalidArgument,
            ClientError::Api { code, status, .. } => match code.as_str() {
                "no_licenses_available" => TesseraStatus::NoLicenses,
                "component_not_licensed" => TesseraStatus::NotLicensed,
                "borrow_not_allowed" => TesseraStatus::BorrowNotAllowed,
                "lease_not_found" | "lease_secret_wrong" => TesseraStatus::LeaseLost,
                "no_quorum" | "not_primary" | "unavailable" if *status == 503 => {
                    TesseraStatus::Unreachable
                }
                _ => TesseraStatus::Refused,
            },
        };
        self.fail(status, error.to_string())
    }
}

/// Checks out a license of `component` for this machine and keeps it alive with heartbeats
/// until `tessera_checkin` (a borrowing of the component kept on this machine, while it
/// holds, is answered instead, without a server). `flags`: 0, or `TESSERA_CHECKOUT_WAIT`. On `TESSERA_STATUS_OK`,
/// `*lease` is the lease; otherwise it is left NULL and `tessera_last_error` says why.
///
/// # Safety
/// `context` comes from `tessera_init`; `component` is a NUL-terminated string; `lease`
/// points to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_checkout(
    context: *mut TesseraContext,
    component: *const c_char,
    flags: u32,
    lease: *mut *mut TesseraLease,
) -> TesseraStatus {
    // SAFETY: forwarded from the caller.
    guarded(|| unsafe { checkout(context, component, flags, lease) })
}

/// # Safety
/// As `tessera_checkout`.
unsafe fn checkout(
    context: *mut TesseraContext,
    component: *const c_char,
    flags: u32,
    lease: *mut *mut TesseraLease,
) -> TesseraStatus {
    // SAFETY: forwarded from the caller.
    unsafe {
        take_license(context, component, lease, |context, component| {
            let callback = context.callback.clone();
            let events = Arc::new(move |lease_id: &str, event: &GuardEvent| {
                notify(&callback, lease_id, event)
            });
            let wait = flags & TESSERA_CHECKOUT_WAIT != 0;
            context.client.checkout(component, wait, Some(events))
        })
    }
}

/// Borrows a license of `component` for `hours` (up to the key's `max_borrow_days`): no
/// heartbeat is needed until it ends, and it is kept on this machine (in the directory of
/// `tessera_set_borrow_dir`, else `$TESSERA_BORROW_DIR`, else
/// `~/.local/state/tessera/borrowed`), so that `tessera_checkout` of the component answers
/// with it, offline, until its end. `tessera_checkin` returns it early.
///
/// # Safety
/// As `tessera_checkout`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_borrow(
    context: *mut TesseraContext,
    component: *const c_char,
    hours: u32,
    lease: *mut *mut TesseraLease,
) -> TesseraStatus {
    // SAFETY: forwarded from the caller.
    guarded(|| unsafe {
        take_license(context, component, lease, |context, component| {
            context.client.borrow(component, hours)
        })
    })
}

/// Keeps this context's borrowings in `directory` (NULL or empty: the default). Call it
/// before the context is used from other threads.
///
/// # Safety
/// `context` comes from `tessera_init`; `directory` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_set_borrow_dir(
    context: *mut TesseraContext,
    directory: *const c_char,
) -> TesseraStatus {
    // SAFETY: the caller passes a live context (or NULL) and a string (or NULL).
    let (context, directory) = unsafe { (context.as_mut(), read(directory)) };
    let Some(context) = context else {
        return TesseraStatus::InvalidArgument;
    };
    let dir = directory
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(BorrowStore::default_dir);
    context.client.set_borrow_store(dir.map(BorrowStore::new));
    TesseraStatus::Ok
}

/// The argument checks of `tessera_checkout` and `tessera_borrow`, then `take`.
///
/// # Safety
/// As `tessera_checkout`.
unsafe fn take_license(
    context: *mut TesseraContext,
    component: *const c_char,
    lease: *mut *mut TesseraLease,
    take: impl FnOnce(&TesseraContext, &str) -> Result<Held, ClientError>,
) -> TesseraStatus {
    // SAFETY: the caller passes a live context.
    let Some(context) = (unsafe { context.as_ref() }) else {
        return TesseraStatus::InvalidArgument;
    };
    if lease.is_null() {
        return context.fail(TesseraStatus::InvalidArgument, "lease is NULL".into());
    }
    // SAFETY: checked non-NULL; the caller gives writable storage.
    unsafe { *lease = std::ptr::null_mut() };
    // SAFETY: forwarded from the caller.
    let Some(component) = (unsafe { read(component) }).filter(|c| !c.is_empty()) else {
        return context.fail(
            TesseraStatus::InvalidArgument,
            "component is NULL or empty".into(),
        );
    };
    match take(context, &component) {
        Ok(held) => {
            let held = TesseraLease {
                lease_id: c_string(held.lease_id()),
                held: Some(held),
            };
            // SAFETY: checked non-NULL above.
            unsafe { *lease = Box::into_raw(Box::new(held)) };
            TesseraStatus::Ok
        }
        Err(error) => context.fail_with(&error),
    }
}

fn notify(callback: &Mutex<Callback>, lease_id: &str, event: &GuardEvent) {
    let (function, user_data) = {
        let slot = callback.lock().unwrap_or_else(|e| e.into_inner());
        (slot.function, slot.user_data)
    };
    let Some(function) = function else {
        return;
    };
    let (kind, message) = match event {
        GuardEvent::Reconnecting { error } => (TesseraEvent::Reconnecting, error.clone()),
        GuardEvent::Reconnected => (TesseraEvent::Reconnected, String::new()),
        GuardEvent::Lost { reason } => (TesseraEvent::LeaseLost, reason.clone()),
    };
    let (lease_id, message) = (c_string(lease_id), c_string(message));
    // SAFETY: the application registered this function for these arguments.
    unsafe {
        function(
            kind,
            lease_id.as_ptr(),
            message.as_ptr(),
            user_data as *mut c_void,
        )
    };
}

/// The lease's id (owned by the lease: valid until it is checked in).
///
/// # Safety
/// `lease` comes from `tessera_checkout` and was not checked in.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_lease_id(lease: *const TesseraLease) -> *const c_char {
    // SAFETY: the caller passes a live lease.
    match unsafe { lease.as_ref() } {
        Some(lease) => lease.lease_id.as_ptr(),
        None => std::ptr::null(),
    }
}

/// Whether the lease is still held: `TESSERA_STATUS_OK`, or `TESSERA_STATUS_LEASE_LOST`
/// (with the reason in `tessera_last_error`).
///
/// # Safety
/// `context` and `lease` are live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_lease_status(
    context: *mut TesseraContext,
    lease: *const TesseraLease,
) -> TesseraStatus {
    // SAFETY: the caller passes live pointers.
    let (Some(context), Some(lease)) = (unsafe { context.as_ref() }, unsafe { lease.as_ref() })
    else {
        return TesseraStatus::InvalidArgument;
    };
    match lease.held.as_ref().and_then(Held::lost) {
        Some(reason) => context.fail(TesseraStatus::LeaseLost, reason),
        None => TesseraStatus::Ok,
    }
}

/// Stops the heartbeat, returns the license to the server and frees the lease (also when
/// the server could not be told: the license then comes back when the lease expires).
///
/// # Safety
/// `context` is live; `lease` comes from `tessera_checkout` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_checkin(
    context: *mut TesseraContext,
    lease: *mut TesseraLease,
) -> TesseraStatus {
    // SAFETY: forwarded from the caller.
    guarded(|| unsafe { checkin(context, lease) })
}

/// # Safety
/// As `tessera_checkin`.
unsafe fn checkin(context: *mut TesseraContext, lease: *mut TesseraLease) -> TesseraStatus {
    // SAFETY: the caller passes a live context.
    let Some(context) = (unsafe { context.as_ref() }) else {
        return TesseraStatus::InvalidArgument;
    };
    if lease.is_null() {
        return context.fail(TesseraStatus::InvalidArgument, "lease is NULL".into());
    }
    // SAFETY: from `tessera_checkout`, given back once.
    let mut lease = unsafe { Box::from_raw(lease) };
    let Some(held) = lease.held.take() else {
        return TesseraStatus::Ok;
    };
    match held.checkin() {
        Ok(()) => TesseraStatus::Ok,
        Err(error) => context.fail_with(&error),
    }
}

/// The message of the last error of a call on this thread (like `errno`: valid until the
/// next call on this thread). `context` is accepted for symmetry and not read.
#[unsafe(no_mangle)]
pub extern "C" fn tessera_last_error(context: *const TesseraContext) -> *const c_char {
    let _ = context;
    LAST_ERROR.with(|error| error.borrow().as_ptr())
}

/// Frees the context. The callback is never called after this. Leases still held keep
/// their heartbeat until `tessera_checkin` or `tessera_lease_free` (check them in first).
///
/// # Safety
/// `context` comes from `tessera_init` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_free(context: *mut TesseraContext) {
    if context.is_null() {
        return;
    }
    guarded(|| {
        // SAFETY: from `tessera_init`, given back once.
        let context = unsafe { Box::from_raw(context) };
        let mut slot = context.callback.lock().unwrap_or_else(|e| e.into_inner());
        slot.function = None;
        TesseraStatus::Ok
    });
}

/// Frees a lease handle without returning a borrowing: the borrowing stays kept on this
/// machine, and `tessera_checkout` of its component answers with it again. (A heartbeated
/// lease is checked in, as by `tessera_checkin`.)
///
/// # Safety
/// `lease` comes from `tessera_checkout` or `tessera_borrow` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_lease_free(lease: *mut TesseraLease) -> TesseraStatus {
    if lease.is_null() {
        return TesseraStatus::InvalidArgument;
    }
    // SAFETY: from `tessera_checkout` or `tessera_borrow`, given back once.
    guarded(|| {
        drop(unsafe { Box::from_raw(lease) });
        TesseraStatus::Ok
    })
}

/// Whether the license is a borrowing (1) or a lease heartbeated by the SDK (0).
///
/// # Safety
/// `lease` is live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_lease_borrowed(lease: *const TesseraLease) -> i32 {
    // SAFETY: the caller passes a live lease.
    let held = unsafe { lease.as_ref() }.and_then(|lease| lease.held.as_ref());
    i32::from(held.is_some_and(Held::is_borrowed))
}

/// When the lease ends unless renewed (a borrowing: when it must be returned), in seconds
/// since the Unix epoch; 0 for a NULL lease.
///
/// # Safety
/// `lease` is live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn tessera_lease_expires_at(lease: *const TesseraLease) -> i64 {
    // SAFETY: the caller passes a live lease.
    let held = unsafe { lease.as_ref() }.and_then(|lease| lease.held.as_ref());
    held.map_or(0, |held| held.lease().expires_at.as_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_arguments_are_named_and_nothing_panics_across_the_boundary() {
        let bad = c_string("not a key");
        let servers = c_string("http://127.0.0.1:9");
        // SAFETY: NUL-terminated strings.
        let context = unsafe { tessera_init(bad.as_ptr(), servers.as_ptr()) };
        assert!(context.is_null());
        // SAFETY: the pointer is this thread's last error.
        let message = unsafe { CStr::from_ptr(tessera_init_error()) };
        assert!(message.to_str().unwrap().contains("vendor_public_key"));
        let mut lease = std::ptr::null_mut();
        let component = c_string("cad");
        // SAFETY: a NULL context is refused before anything is read.
        let status =
            unsafe { tessera_checkout(std::ptr::null_mut(), component.as_ptr(), 0, &mut lease) };
        assert_eq!(status, TesseraStatus::InvalidArgument);
    }

    #[test]
    fn a_call_from_the_sdks_own_thread_is_refused_not_aborted() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let status = runtime.block_on(async { guarded(|| TesseraStatus::Ok) });
        assert_eq!(status, TesseraStatus::InvalidArgument);
        assert_eq!(guarded(|| panic!("boom")), TesseraStatus::Refused);
    }
}
