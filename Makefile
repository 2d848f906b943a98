# Install preforkd: `make install` (PREFIX=/usr/local), or `make install PREFIX=/usr
# DESTDIR=/tmp/root` to stage a package. The configuration goes to /etc/preforkd (kept if
# present, with its conf.d/ for included listeners), units to $(PREFIX)/lib/systemd/system
# with paths rewritten to $(BINDIR), the system users of the workers and of exec children
# (preforkd, preforkd-exec) to $(PREFIX)/lib/sysusers.d (and created when DESTDIR is empty).
# uninstall leaves the user: files it owned may remain.
# `make deb` builds the Debian package target/debian/preforkd_VERSION-1_ARCH.deb with cargo-deb
# (`cargo install cargo-deb --locked`); see [package.metadata.deb] in Cargo.toml.

PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
BINDIR := $(PREFIX)/bin
MANDIR := $(PREFIX)/share/man
UNITDIR := $(PREFIX)/lib/systemd/system
SYSUSERSDIR := $(PREFIX)/lib/sysusers.d
CARGO ?= cargo

.PHONY: all build install uninstall deb

all: build

build:
	$(CARGO) build --release --locked

install: build
	install -Dm755 target/release/preforkd $(DESTDIR)$(BINDIR)/preforkd
	install -Dm644 man/preforkd.8 $(DESTDIR)$(MANDIR)/man8/preforkd.8
	install -Dm644 man/preforkd.toml.5 $(DESTDIR)$(MANDIR)/man5/preforkd.toml.5
	install -d $(DESTDIR)$(UNITDIR)
	sed -e 's#/usr/bin/preforkd#$(BINDIR)/preforkd#g' -e 's#/etc/preforkd/#$(SYSCONFDIR)/preforkd/#g' \
		systemd/preforkd.service > $(DESTDIR)$(UNITDIR)/preforkd.service
	install -m644 systemd/preforkd.socket $(DESTDIR)$(UNITDIR)/preforkd.socket
	install -Dm644 systemd/preforkd.sysusers $(DESTDIR)$(SYSUSERSDIR)/preforkd.conf
	# The workers' and exec children's users: created now on a live install (a package does
	# it in postinst).
	if [ -z "$(DESTDIR)" ] && command -v systemd-sysusers >/dev/null; then \
		systemd-sysusers $(SYSUSERSDIR)/preforkd.conf; fi
	install -Dm644 config/logrotate.d/preforkd $(DESTDIR)$(SYSCONFDIR)/logrotate.d/preforkd
	sed -i -e 's#/usr/bin/preforkd#$(BINDIR)/preforkd#g' -e 's#/etc/preforkd/#$(SYSCONFDIR)/preforkd/#g' \
		$(DESTDIR)$(SYSCONFDIR)/logrotate.d/preforkd
	install -d $(DESTDIR)$(SYSCONFDIR)/preforkd $(DESTDIR)$(SYSCONFDIR)/preforkd/conf.d
	# The directory the configuration includes (conf.d/*.toml), with a note on its use.
	test -e $(DESTDIR)$(SYSCONFDIR)/preforkd/conf.d/README || \
		install -m644 config/conf.d/README $(DESTDIR)$(SYSCONFDIR)/preforkd/conf.d/README
	test -e $(DESTDIR)$(SYSCONFDIR)/preforkd/preforkd.toml || \
		sed 's#^pid_file = .*#pid_file = "/run/preforkd/preforkd.pid"#' config/preforkd.toml \
		> $(DESTDIR)$(SYSCONFDIR)/preforkd/preforkd.toml

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/preforkd $(DESTDIR)$(MANDIR)/man8/preforkd.8 \
		$(DESTDIR)$(MANDIR)/man5/preforkd.toml.5 $(DESTDIR)$(UNITDIR)/preforkd.service \
		$(DESTDIR)$(UNITDIR)/preforkd.socket $(DESTDIR)$(SYSCONFDIR)/logrotate.d/preforkd \
		$(DESTDIR)$(SYSUSERSDIR)/preforkd.conf

# The packaged configuration: the shipped one, with the pid file where the unit's
# RuntimeDirectory puts it and the workers as the user of systemd/preforkd.sysusers.
target/deb-assets/preforkd.toml: config/preforkd.toml
	mkdir -p $(@D)
	sed -e 's#^pid_file = .*#pid_file = "/run/preforkd/preforkd.pid"#' \
		-e 's#^user = .*#user = "preforkd"#' $< > $@.tmp
	grep -qx 'pid_file = "/run/preforkd/preforkd.pid"' $@.tmp
	grep -qx 'user = "preforkd"' $@.tmp
	mv $@.tmp $@

deb: target/deb-assets/preforkd.toml
	rm -f target/debian/preforkd_*.deb target/debian/preforkd-dbgsym_*.ddeb
	$(CARGO) deb --locked
