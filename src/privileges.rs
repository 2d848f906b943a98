//! Process credentials and resource limits: the master's `RLIMIT_NOFILE`, and the workers'
//! switch to an unprivileged user.
//!
//! The master resolves the user and group at start ([`Credentials::resolve`]) and keeps its
//! own privileges, so it can bind new ports on reload. A worker switches right after
//! `fork(2)`, before it accepts anything: supplementary groups (initgroups(3)), then the
//! group, then the user, in that order, and verifies that root cannot be regained.

use std::ffi::CString;
use std::io;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::unistd::{
    Gid, Group, Uid, User, getegid, geteuid, getgid, getuid, initgroups, setgid, setuid,
};
use thiserror::Error;

/// Credentials could not be resolved or applied.
#[derive(Debug, Error)]
pub enum PrivilegeError {
    /// The user or group does not exist.
    #[error("unknown {kind} {name:?}")]
    Unknown {
        /// `user` or `group`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A system call failed.
    #[error("{step}: {source}")]
    System {
        /// What was being done.
        step: String,
        /// The system error.
        source: io::Error,
    },
    /// The switch did not stick (root could be regained, or the ids differ).
    #[error("privileges not dropped: {0}")]
    NotDropped(String),
    /// A resource limit could not be set as asked.
    #[error("{0}")]
    Limit(String),
}

impl PrivilegeError {
    /// The configuration key this error is about when it concerns the workers' credentials
    /// (`daemon.user` or `daemon.group`), and what to say about it: for an unknown name, that
    /// the workers cannot switch to it and how such a user is created. `preforkd check` and
    /// startup both print it, so the hint is the same whichever meets the problem first.
    pub fn for_workers(&self) -> (&'static str, String) {
        match self {
            PrivilegeError::Unknown { kind: "group", .. } => {
                ("daemon.group", format!("{self}: workers cannot switch to it"))
            }
            PrivilegeError::Unknown { .. } => (
                "daemon.user",
                format!(
                    "{self}: workers cannot switch to it (create it, e.g. with systemd-sysusers or useradd --system)"
                ),
            ),
            _ => ("daemon.user", self.to_string()),
        }
    }
}

fn system(step: impl Into<String>) -> impl FnOnce(nix::Error) -> PrivilegeError {
    let step = step.into();
    move |e| PrivilegeError::System { step, source: e.into() }
}

/// The user and group workers run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (for initgroups(3)).
    pub user: String,
    /// User id.
    pub uid: Uid,
    /// Group id.
    pub gid: Gid,
}

impl Credentials {
    /// Looks up `user` (a name or a number) and `group` (default: the user's primary
    /// group).
    ///
    /// # Errors
    /// [`PrivilegeError::Unknown`] when either does not exist.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<Self, PrivilegeError> {
        let unknown = |kind, name: &str| PrivilegeError::Unknown { kind, name: name.to_owned() };
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        }
        .map_err(system(format!("look up user {user:?}")))?
        .ok_or_else(|| unknown("user", user))?;
        let gid = match group {
            None => found.gid,
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => Gid::from_raw(gid),
                Err(_) => {
                    Group::from_name(group)
                        .map_err(system(format!("look up group {group:?}")))?
                        .ok_or_else(|| unknown("group", group))?
                        .gid
                }
            },
        };
        Ok(Credentials { user: found.name, uid: found.uid, gid })
    }

    /// Switches this process to these credentials: supplementary groups, group, user.
    ///
    /// # Errors
    /// [`PrivilegeError`] if a step fails or the result does not hold; the caller must not
    /// go on serving then.
    pub fn apply(&self) -> Result<(), PrivilegeError> {
        let name = CString::new(self.user.as_bytes())
            .map_err(|_| PrivilegeError::NotDropped("user name has a NUL byte".into()))?;
        initgroups(&name, self.gid).map_err(system("initgroups"))?;
        setgid(self.gid).map_err(system(format!("setgid({})", self.gid)))?;
        setuid(self.uid).map_err(system(format!("setuid({})", self.uid)))?;
        let ids = (getuid(), geteuid(), getgid(), getegid());
        if ids != (self.uid, self.uid, self.gid, self.gid) {
            return Err(PrivilegeError::NotDropped(format!("ids are {ids:?}")));
        }
        if !self.uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
            return Err(PrivilegeError::NotDropped("setuid(0) succeeded afterwards".into()));
        }
        Ok(())
    }
}

/// The user id of `user`, a name or a number (a number is taken as it is, as chown(1) does).
///
/// # Errors
/// `NotFound` for an unknown name; the lookup's error otherwise.
pub fn user_id(user: &str) -> io::Result<u32> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(uid);
    }
    User::from_name(user)?
        .map(|found| found.uid.as_raw())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("unknown user {user:?}")))
}

/// The group id of `group`, a name or a number (a number is taken as it is).
///
/// # Errors
/// `NotFound` for an unknown name; the lookup's error otherwise.
pub fn group_id(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    Group::from_name(group)?
        .map(|found| found.gid.as_raw())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("unknown group {group:?}")))
}

/// Raises (or lowers) `RLIMIT_NOFILE` to `limit`, soft and hard. Without privileges the
/// hard limit cannot grow, so the soft limit is raised as far as the hard one allows and the
/// shortfall reported.
///
/// # Errors
/// setrlimit(2) failed, or only a lower limit could be set (the message says which).
pub fn set_nofile(limit: u64) -> Result<(), PrivilegeError> {
    if setrlimit(Resource::RLIMIT_NOFILE, limit, limit).is_ok() {
        return Ok(());
    }
    let (_, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(system("getrlimit(RLIMIT_NOFILE)"))?;
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(limit), hard)
        .map_err(system("setrlimit(RLIMIT_NOFILE)"))?;
    Err(PrivilegeError::Limit(format!(
        "RLIMIT_NOFILE could only be set to the hard limit {hard}, not {limit}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        let root = Credentials::resolve("root", None).unwrap();
        assert_eq!((root.uid.as_raw(), root.gid.as_raw()), (0, 0));
        assert_eq!(Credentials::resolve("0", Some("0")).unwrap().user, "root");
        assert!(matches!(
            Credentials::resolve("no-such-user-preforkd", None),
            Err(PrivilegeError::Unknown { kind: "user", .. })
        ));
        assert!(matches!(
            Credentials::resolve("root", Some("no-such-group-preforkd")),
            Err(PrivilegeError::Unknown { kind: "group", .. })
        ));
    }
}
