//! Who is on the other end of a Unix socket, beyond `SO_PEERCRED`: the supplementary
//! groups (`SO_PEERGROUPS`).

use std::io;
use std::os::fd::AsRawFd;

use tokio::net::UnixStream;

/// `SO_PEERGROUPS` (not in the libc crate). The asm-generic value; architectures with
/// their own socket option numbers fall back to the primary group only.
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "powerpc64",
        target_arch = "s390x"
    )
))]
const SO_PEERGROUPS: Option<libc::c_int> = Some(59);
#[cfg(not(all(
    any(target_os = "linux", target_os = "android"),
    any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "loongarch64",
        target_arch = "powerpc64",
        target_arch = "s390x"
    )
)))]
const SO_PEERGROUPS: Option<libc::c_int> = None;

/// The peer's supplementary groups as of `connect`, or `None` where the kernel cannot say.
pub(super) fn peer_supplementary_groups(stream: &UnixStream) -> Option<Vec<u32>> {
    let option = SO_PEERGROUPS?;
    let mut n_groups = 32usize;
    loop {
        let mut groups = vec![0 as libc::gid_t; n_groups];
        let mut len = libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice())).ok()?;
        // SAFETY: `groups` has room for `len` bytes, and `len` is a valid in/out length.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let len = len as usize;
        if rc == 0 {
            groups.truncate(len / std::mem::size_of::<libc::gid_t>());
            return Some(groups);
        }
        let error = io::Error::last_os_error();
        // ERANGE: the kernel has put the size it needs in `len`.
        if error.raw_os_error() == Some(libc::ERANGE)
            && len > std::mem::size_of_val(groups.as_slice())
            && n_groups < 65536
        {
            n_groups = len.div_ceil(std::mem::size_of::<libc::gid_t>());
            continue;
        }
        return None;
    }
}
