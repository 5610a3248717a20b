//! The upper: copy-up (of an object, its ancestors, its other names, or a
//! whole directory tree), whiteouts and opaque directories, and the
//! placement of new names over whiteouts. Every change to the upper's
//! namespace runs under `ns_lock`.

use super::*;

impl Overlay {
    /// The node's upper object, copying the node (and the directories above
    /// it) up first if needed. Caller holds `ns_lock`.
    pub(super) fn copy_up(&self, id: u64) -> Result<Arc<HostNode>> {
        let node = self.node(id)?;
        if let Some(u) = node.upper() {
            return Ok(u);
        }
        self.upper_dir()?;
        let mut chain = vec![(id, node)];
        loop {
            let (pid, _) = chain.last().expect("non-empty").1.place();
            let parent = self.node(pid)?;
            if parent.upper().is_some() {
                break;
            }
            if pid == ROOT_ID {
                return Err(Errno::EIO);
            }
            chain.push((pid, parent));
        }
        for (id, n) in chain.iter().rev() {
            self.copy_up_one(*id, n)?;
        }
        let (_, node) = &chain[0];
        let up = node.upper().ok_or(Errno::EIO)?;
        if node.kind != FileKind::Directory
            && let Some(top) = node.lowers().first()
        {
            self.link_other_names(node, top, &up);
        }
        Ok(up)
    }

    /// Keeps a lower hard link a hard link after copy-up: every other name
    /// of the same lower inode that still shows the lower object becomes a
    /// link to the upper copy (kernel overlayfs does the same with
    /// `index=on`). Image manifests list all the names; for a host lower, the
    /// names it was looked up by are known.
    pub(super) fn link_other_names(&self, node: &ONode, top: &LRef, up: &Arc<HostNode>) {
        let layer = self.layer(top);
        let Ok(lst) = layer.stat(&top.obj) else {
            return;
        };
        if lst.nlink < 2 {
            return;
        }
        let warn = |what: String, e: Errno| {
            tracing::warn!(
                "copy-up: hard link {what} of {} not kept: {e}",
                layer.describe()
            )
        };
        for path in layer.other_names(&top.obj) {
            if let Err(e) = self.link_path(top.layer, lst.key, &path, up) {
                warn(String::from_utf8_lossy(&path.join(&b'/')).into_owned(), e);
            }
        }
        let aliases = node.aliases.lock().take().unwrap_or_default();
        for (dir, name) in *aliases {
            if let Err(e) = self.link_in(dir, &name, top.layer, lst.key, up) {
                warn(format!("{name:?}"), e);
            }
        }
    }

    pub(super) fn link_path(
        &self,
        layer: u32,
        key: (u64, u64),
        path: &[Vec<u8>],
        up: &Arc<HostNode>,
    ) -> Result<()> {
        let describe = || self.layers.get(layer).describe();
        let (name, dirs) = path.split_last().ok_or(Errno::EINVAL)?;
        let name = layer::layer_name(&describe(), name)?;
        // Walk down with lookup references, given back at the end.
        let mut taken = Vec::new();
        let mut dir = ROOT_ID;
        let walked = dirs.iter().try_for_each(|c| {
            let c = layer::layer_name(&describe(), c)?;
            dir = self.lookup_in(dir, &c)?.attr.ino;
            taken.push(dir);
            Ok(())
        });
        let res = walked.and_then(|()| self.link_in(dir, &name, layer, key, up));
        for id in taken {
            self.table.forget(id, 1);
        }
        res
    }

    /// Links `up` at `name` in the directory node `dir` if that name still
    /// shows the lower object (`layer`, `key`).
    pub(super) fn link_in(
        &self,
        dir: u64,
        name: &CStr,
        layer: u32,
        key: (u64, u64),
        up: &Arc<HostNode>,
    ) -> Result<()> {
        let node = self.node(dir)?;
        let shows_lower = match self.resolve(&node, name)? {
            Some(f) => {
                f.upper.is_none()
                    && f.lowers
                        .first()
                        .is_some_and(|(r, st)| r.layer == layer && st.key == key)
            }
            None => false,
        };
        if !shows_lower {
            return Ok(());
        }
        let h = self.upper_dir()?;
        let pfd = h.fd(&self.copy_up(dir)?)?;
        ops::link_fd(h, h.fd(up)?.as_fd(), pfd.as_fd(), name)
    }

    /// Points the node's read-only handles on its lower file at its copy
    /// `up` (set as the node's upper before this is called).
    pub(super) fn move_lower_readers(&self, id: u64, up: &Arc<HostNode>) {
        let Some(fhs) = self.lower_readers.lock().remove(&id) else {
            return;
        };
        let Ok(h) = self.upper_dir() else { return };
        for fh in fhs {
            match h.fd(up).and_then(|fd| h.reopen(fd.as_fd(), OFlags::RDONLY)) {
                Ok(fd) => {
                    self.files.replace(fh, fd);
                    self.open_upper.lock().entry(id).or_default().push(fh);
                }
                Err(e) => tracing::warn!(
                    ino = id,
                    fh,
                    "a reader stays on the lower file after copy-up: {e}"
                ),
            }
        }
    }

    /// Records a read-only handle on the node's lower file; if a copy-up
    /// finished meanwhile, moves it at once (the copy-up sets the upper
    /// before it looks for readers, so one of the two sees the other).
    pub(super) fn add_lower_reader(&self, id: u64, node: &ONode, fh: u64) {
        self.lower_readers.lock().entry(id).or_default().push(fh);
        if let Some(up) = node.upper() {
            self.move_lower_readers(id, &up);
        }
    }

    pub(super) fn drop_lower_reader(&self, id: u64, fh: u64) {
        let mut readers = self.lower_readers.lock();
        if let Some(fhs) = readers.get_mut(&id) {
            fhs.retain(|f| *f != fh);
            if fhs.is_empty() {
                readers.remove(&id);
            }
        }
    }

    /// Copies one node up into its parent's upper directory (which exists).
    pub(super) fn copy_up_one(&self, id: u64, node: &ONode) -> Result<()> {
        if node.upper().is_some() {
            return Ok(());
        }
        let h = self.upper_dir()?;
        let (pid, name) = node.place();
        let parent = self.node(pid)?;
        let pup = parent.upper().ok_or(Errno::EIO)?;
        let pfd = h.fd(&pup)?;
        let lowers = node.lowers();
        let top = lowers.first().ok_or(Errno::EIO)?;
        let st = self.copy_object(pfd.as_fd(), &name, top)?;
        let up = Arc::new(h.make_node(pfd.as_fd(), &name, &st)?);
        *node.upper.write() = Some(up.clone());
        if node.kind != FileKind::Directory {
            self.move_lower_readers(id, &up);
        }
        // A directory too: keyed by its copy from now on (see `register`).
        // A copy of a frozen object keeps the key it had.
        if !self.layers.is_frozen(top.layer) {
            let lst = self.layer(top).stat(&top.obj)?;
            self.table
                .rekey(id, Key::Lower(top.layer, lst.key.0, lst.key.1).copied_up());
        }
        self.remember_host_objects(id, node);
        Ok(())
    }

    /// Creates `name` in the upper directory `pfd` as a copy of the lower
    /// object `src`; an object already there (copied up before, e.g. by a
    /// directory rename) is kept as is. Returns the upper object's stat.
    pub(super) fn copy_object(&self, pfd: BorrowedFd<'_>, name: &CStr, src: &LRef) -> Result<Stat> {
        let h = self.upper_dir()?;
        match h.stat_child(pfd, name) {
            Ok(st) if !host_whiteout(pfd, name, &st) => return Ok(st),
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let layer = self.layer(src);
        let lst = layer.stat(&src.obj)?;
        let tmp = tmp_name();
        let made = self.build_copy(pfd, &tmp, src, &lst);
        let placed = made.and_then(|()| Ok(rustix::fs::renameat(pfd, tmp.as_c_str(), pfd, name)?));
        if let Err(e) = placed {
            let flags = if lst.is_dir() {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            let _ = rustix::fs::unlinkat(pfd, tmp.as_c_str(), flags);
            tracing::warn!(
                "copy-up of {:?} from {} failed: {e}",
                name,
                layer.describe()
            );
            return Err(e);
        }
        h.stat_child(pfd, name)
    }

    /// The origin a copy of `src` records: the lower object, or for an
    /// object of a frozen layer the origin that object recorded (else the
    /// object itself), so the copy keeps its node id.
    fn origin_of(&self, src: &LRef, lst: &LStat) -> String {
        if !self.layers.is_frozen(src.layer) {
            return format!("{}:{}:{}", src.layer, lst.key.0, lst.key.1);
        }
        let layer = self.layer(src);
        match layer.xattr(&src.obj, self.origin_xattr) {
            Some(v) if parse_origin(&v, self.layers.base_len()).is_some() => {
                String::from_utf8(v).expect("parsed as UTF-8")
            }
            _ => format!("u:{}:{}", lst.key.0, lst.key.1),
        }
    }

    /// Builds the copy of `src` at `tmp`: the object, then xattrs, owner,
    /// mode and times (mode after owner: chown clears setuid/setgid).
    pub(super) fn build_copy(
        &self,
        pfd: BorrowedFd<'_>,
        tmp: &CStr,
        src: &LRef,
        lst: &LStat,
    ) -> Result<()> {
        let layer = self.layer(src);
        let perm = Mode::from_raw_mode(lst.mode & 0o7777);
        let kind = lst.kind().ok_or(Errno::EIO)?;
        let mut file: Option<OwnedFd> = None;
        match kind {
            FileKind::Directory => rustix::fs::mkdirat(pfd, tmp, Mode::from_raw_mode(0o700))?,
            FileKind::Regular => {
                let input = layer.open(&src.obj)?;
                let out = rustix::fs::openat(
                    pfd,
                    tmp,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?;
                ops::copy_data(&input, &out)?;
                file = Some(out);
            }
            FileKind::Symlink => {
                let target = layer.readlink(&src.obj)?;
                rustix::fs::symlinkat(target.as_slice(), pfd, tmp)?;
            }
            FileKind::CharDevice if lst.rdev == 0 => {
                format::make_zero_device(pfd, tmp, lst.mode & 0o7777)?
            }
            _ => rustix::fs::mknodat(
                pfd,
                tmp,
                rustix::fs::FileType::from_raw_mode(lst.mode),
                perm,
                lst.rdev,
            )?,
        }
        format::mark_tmp(pfd, tmp);
        let h = self.upper_dir()?;
        if kind != FileKind::Symlink {
            let target = rustix::fs::openat(
                pfd,
                tmp,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let path = h.proc_path(target.as_fd());
            for (n, v) in layer.xattrs(&src.obj)? {
                if is_private_xattr(&n) {
                    continue;
                }
                let Ok(n) = CString::new(n) else { continue };
                match rustix::fs::setxattr(
                    path.as_c_str(),
                    n.as_c_str(),
                    &v,
                    rustix::fs::XattrFlags::empty(),
                ) {
                    // Namespaces the upper does not have (e.g. security.* on tmpfs).
                    Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::PERM) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let origin = self.origin_of(src, lst);
            rustix::fs::setxattr(
                path.as_c_str(),
                self.origin_xattr,
                origin.as_bytes(),
                rustix::fs::XattrFlags::empty(),
            )?;
        }
        rustix::fs::chownat(
            pfd,
            tmp,
            Some(Uid::from_raw(lst.uid)),
            Some(Gid::from_raw(lst.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if kind != FileKind::Symlink {
            rustix::fs::chmodat(pfd, tmp, perm, AtFlags::empty())?;
        }
        rustix::fs::utimensat(
            pfd,
            tmp,
            &Timestamps {
                last_access: timespec(lst.atime),
                last_modification: timespec(lst.mtime),
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if let Some(f) = file {
            rustix::fs::fsync(&f)?;
        }
        Ok(())
    }

    /// Copies a whole directory tree up (for a rename of a directory that
    /// lowers provide) and marks each copied directory opaque, without the
    /// whiteouts it no longer needs (kernel overlayfs lists an opaque
    /// directory as it is): afterwards the upper holds everything it shows,
    /// so it can move anywhere. Hard links inside the tree stay links, and
    /// every copy records its origin, so node ids survive the move.
    pub(super) fn copy_up_tree(&self, id: u64) -> Result<()> {
        let up = self.copy_up(id)?;
        let node = self.node(id)?;
        let lowers = node.lowers();
        let mut linked = HashMap::new();
        self.copy_dir_contents(&up, &lowers, &mut linked)?;
        if let Some(top) = lowers.first() {
            let lst = self.layer(top).stat(&top.obj)?;
            self.table
                .rekey(id, Key::Lower(top.layer, lst.key.0, lst.key.1).copied_up());
        }
        *node.lowers.write() = Lowers::new();
        Ok(())
    }

    pub(super) fn copy_dir_contents(
        &self,
        up: &Arc<HostNode>,
        lowers: &[LRef],
        linked: &mut HashMap<Key, Arc<HostNode>>,
    ) -> Result<()> {
        let h = self.upper_dir()?;
        let fd = h.fd(up)?;
        let dir = ONode::new(
            FileKind::Directory,
            (0, CString::default()),
            Some(up.clone()),
            lowers.iter().cloned().collect(),
        );
        let mut names = Vec::new();
        for r in lowers {
            format::list_layer(self.layer(r), &r.obj, &mut names)?;
        }
        let mut done = HashSet::new();
        for n in names {
            if n.whiteout || !done.insert(n.name.clone()) {
                continue;
            }
            let Some(found) = self.resolve(&dir, &n.name)? else {
                continue;
            };
            let Some((top, lst)) = found.lowers.first() else {
                continue; // the upper's own
            };
            let lkey = Key::Lower(top.layer, lst.key.0, lst.key.1);
            let child_up = match linked.get(&lkey) {
                Some(first) if found.upper.is_none() => {
                    ops::link_fd(h, h.fd(first)?.as_fd(), fd.as_fd(), &n.name)?;
                    first.clone()
                }
                _ => {
                    let st = self.copy_object(fd.as_fd(), &n.name, top)?;
                    Arc::new(h.make_node(fd.as_fd(), &n.name, &st)?)
                }
            };
            if !lst.is_dir() && lst.nlink > 1 {
                linked.entry(lkey).or_insert_with(|| child_up.clone());
            }
            // A node the kernel knows for the lower object now has its copy.
            if let Some((cid, cnode)) = self.table.get_by_key(&lkey) {
                *cnode.upper.write() = Some(child_up.clone());
                *cnode.lowers.write() = Lowers::new();
                if cnode.kind != FileKind::Directory {
                    self.move_lower_readers(cid, &child_up);
                }
                self.table.rekey(cid, lkey.copied_up());
                self.remember_host_objects(cid, &cnode);
            }
            if found.kind == FileKind::Directory {
                let child_lowers: Vec<LRef> = found.lowers.iter().map(|(r, _)| r.clone()).collect();
                self.copy_dir_contents(&child_up, &child_lowers, linked)?;
            }
        }
        Self::drop_whiteouts(fd.as_fd())?;
        self.set_opaque(fd.as_fd())
    }

    pub(super) fn set_opaque(&self, fd: BorrowedFd<'_>) -> Result<()> {
        let h = self.upper_dir()?;
        let path = h.proc_path(fd);
        rustix::fs::setxattr(
            path.as_c_str(),
            self.opaque_xattr,
            b"y",
            rustix::fs::XattrFlags::empty(),
        )?;
        Ok(())
    }

    /// Puts a whiteout at `name` in the upper directory `pfd`.
    pub(super) fn make_whiteout(pfd: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        rustix::fs::mknodat(
            pfd,
            name,
            rustix::fs::FileType::CharacterDevice,
            Mode::empty(),
            0,
        )?;
        Ok(())
    }

    /// Renames within the upper, leaving a whiteout at the source when
    /// `whiteout` (atomically with RENAME_WHITEOUT where the filesystem has it).
    pub(super) fn rename_upper(
        src_dir: BorrowedFd<'_>,
        src: &CStr,
        dst_dir: BorrowedFd<'_>,
        dst: &CStr,
        flags: RenameFlags,
        whiteout: bool,
    ) -> Result<()> {
        if !whiteout {
            rustix::fs::renameat_with(src_dir, src, dst_dir, dst, flags)?;
            return Ok(());
        }
        match rustix::fs::renameat_with(src_dir, src, dst_dir, dst, flags | RenameFlags::WHITEOUT) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::INVAL) => {
                rustix::fs::renameat_with(src_dir, src, dst_dir, dst, flags)?;
                Self::make_whiteout(src_dir, src)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a directory's remaining whiteouts and temporaries left by a
    /// crash (it shows no names), so the host lets it be removed or replaced;
    /// anything else is ENOTEMPTY.
    pub(super) fn clear_whiteouts(dfd: BorrowedFd<'_>) -> Result<()> {
        Self::remove_hidden(dfd, true)
    }

    /// Removes the whiteouts and crash leftovers of a directory about to be
    /// opaque, keeping everything else.
    pub(super) fn drop_whiteouts(dfd: BorrowedFd<'_>) -> Result<()> {
        Self::remove_hidden(dfd, false)
    }

    pub(super) fn remove_hidden(dfd: BorrowedFd<'_>, only_hidden: bool) -> Result<()> {
        let rd = rustix::fs::openat(
            dfd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut reader = rustix::fs::Dir::read_from(&rd)?;
        let mut gone = Vec::new();
        for ent in &mut reader {
            let ent = ent?;
            let name = ent.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            let st = rustix::fs::statat(&rd, name, AtFlags::SYMLINK_NOFOLLOW)?;
            if host_whiteout(rd.as_fd(), name, &st) || format::is_strata_tmp(rd.as_fd(), name) {
                let dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                gone.push((name.to_owned(), dir));
            } else if only_hidden {
                return Err(Errno::ENOTEMPTY);
            }
        }
        for (name, dir) in gone {
            let flags = if dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            rustix::fs::unlinkat(&rd, &name, flags)?;
        }
        Ok(())
    }

    /// Makes a new object `name` in the upper directory `pfd` with `make`
    /// (which gets the name to create) and hands it to the caller (`ctx`;
    /// `None` for a new link to an existing object). Where a
    /// whiteout holds the name, the object is built under a temporary name
    /// and swapped in; a directory made there is opaque, so the lower
    /// directory it replaces stays hidden.
    pub(super) fn place_new<T>(
        &self,
        ctx: Option<&Ctx>,
        pfd: BorrowedFd<'_>,
        name: &CStr,
        is_dir: bool,
        make: impl FnOnce(&CStr) -> Result<T>,
    ) -> Result<T> {
        let h = self.upper_dir()?;
        let over_whiteout = match h.stat_child(pfd, name) {
            Ok(st) if host_whiteout(pfd, name, &st) => true,
            Ok(_) => return Err(Errno::EEXIST),
            Err(Errno::ENOENT) => false,
            Err(e) => return Err(e),
        };
        let give = |n: &CStr| match ctx {
            Some(ctx) => ops::finish_new(h, ctx, pfd, n),
            None => Ok(()),
        };
        if !over_whiteout {
            let out = make(name)?;
            give(name)?;
            return Ok(out);
        }
        let tmp = tmp_name();
        let out = make(&tmp)?;
        format::mark_tmp(pfd, &tmp);
        let res = give(&tmp).and_then(|()| {
            if is_dir {
                let fd = rustix::fs::openat(
                    pfd,
                    tmp.as_c_str(),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                self.set_opaque(fd.as_fd())?;
                rustix::fs::renameat_with(pfd, tmp.as_c_str(), pfd, name, RenameFlags::EXCHANGE)?;
                rustix::fs::unlinkat(pfd, tmp.as_c_str(), AtFlags::empty())?;
            } else {
                rustix::fs::renameat(pfd, tmp.as_c_str(), pfd, name)?;
            }
            format::unmark_tmp(pfd, name);
            Ok(())
        });
        if let Err(e) = res {
            let flags = if is_dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            let _ = rustix::fs::unlinkat(pfd, tmp.as_c_str(), flags);
            return Err(e);
        }
        Ok(out)
    }
}
