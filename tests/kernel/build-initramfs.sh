#!/bin/bash
# Build a tiny initramfs that attaches an NBD export as /dev/nbd0 with the real Linux kernel
# driver and exercises it: direct-I/O write + read-back, mkfs.ext4, mount, file write, e2fsck.
#
# Usage: build-initramfs.sh OUTPUT.cpio.gz [KERNEL_VERSION]
#
# The guest's /init reads the server from the kernel command line:
#   twb.port=PORT twb.export=NAME [twb.host=10.0.2.2] [twb.mode=failover twb.files=N]
# so one image serves any port and export. twb.mode=failover (the HA takeover test) attaches with
# nbd-reconnect (nbd-reconnect.c beside this script, compiled here with gcc: it reconnects to the
# same address when the server dies, and the kernel holds the requests meanwhile), makes an ext4, and writes N files with a `sync` after every fourth,
# printing "TWB-SYNCED: n" after each; the host kills the serving node meanwhile. Then every file
# is checked against the checksum taken when it was written, and e2fsck -fn must be clean. It prints "TWB-PASS: <step>" / "TWB-FAIL: <step>" lines
# and finishes with "TWB-RESULT: PASS" or "TWB-RESULT: FAIL", then powers off.
set -euo pipefail

out=${1:?usage: build-initramfs.sh OUTPUT.cpio.gz [KERNEL_VERSION]}
kver=${2:-}
if [[ -z $kver ]]; then
    # Newest kernel that has an image in /boot and a module tree.
    for img in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
        v=${img#/boot/vmlinuz-}
        if [[ -d /lib/modules/$v ]]; then kver=$v; break; fi
    done
fi
[[ -n $kver && -d /lib/modules/$kver ]] || { echo "build-initramfs: no kernel with modules found in /boot and /lib/modules" >&2; exit 1; }

# Modules the guest needs, in the order given; dependencies are inserted before their users.
wanted_modules=(virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci
                failover net_failover virtio_net nbd ext4 crc32c_generic)
guest_tools=(nbd-client mkfs.ext4 e2fsck)

for tool in busybox cpio gzip modinfo ldd gcc; do
    command -v "$tool" >/dev/null || { echo "build-initramfs: missing tool: $tool" >&2; exit 1; }
done
busybox_path=$(command -v busybox)
if ldd "$busybox_path" >/dev/null 2>&1; then
    echo "build-initramfs: $busybox_path is dynamically linked; install busybox-static" >&2
    exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,lib/modules,usr/bin,usr/sbin}
cp "$busybox_path" "$root/bin/busybox"
for applet in sh mount umount insmod ip dd cmp cat echo sleep poweroff mkdir head sync \
              grep sed tr cut ls rm md5sum hexdump uname cp; do
    ln -sf busybox "$root/bin/$applet"
done

gcc -static -O2 -o "$root/bin/nbd-reconnect" "$(dirname "$0")/nbd-reconnect.c" \
    || { echo "build-initramfs: cannot compile nbd-reconnect.c (needs gcc and libc6-dev)" >&2; exit 1; }

# Copy a binary and every shared library ldd reports for it, keeping their paths.
copy_with_libs() {
    local bin=$1
    mkdir -p "$root$(dirname "$bin")"
    cp -L "$bin" "$root$bin"
    ldd "$bin" | grep -o '/[^ ]*' | while read -r lib; do
        [[ -e $lib ]] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}
for name in "${guest_tools[@]}"; do
    bin=$(PATH=/usr/sbin:/sbin:$PATH command -v "$name") \
        || { echo "build-initramfs: $name not found (install nbd-client and e2fsprogs)" >&2; exit 1; }
    real=$(readlink -f "$bin")
    copy_with_libs "$real"
    [[ $real == /bin/$name ]] || ln -sf "$real" "$root/bin/$name"
done

# Resolve modules with modinfo: depth-first so dependencies come first; skip built-ins.
declare -A seen=()
module_order=()
resolve_module() {
    local mod=$1 path deps dep
    [[ -n ${seen[$mod]:-} ]] && return 0
    seen[$mod]=1
    path=$(modinfo -k "$kver" -n "$mod" 2>/dev/null) || { echo "build-initramfs: module $mod not found for kernel $kver" >&2; exit 1; }
    if [[ $path == "(builtin)" || $path != /* ]]; then
        return 0
    fi
    deps=$(modinfo -k "$kver" -F depends "$mod" 2>/dev/null || true)
    for dep in ${deps//,/ }; do
        resolve_module "$dep"
    done
    module_order+=("$mod:$path")
}
for mod in "${wanted_modules[@]}"; do
    resolve_module "$mod"
done
: >"$root/etc/modules.order"
for entry in "${module_order[@]}"; do
    mod=${entry%%:*}
    path=${entry#*:}
    dest="$root/lib/modules/$mod.ko"
    case $path in
        *.ko.xz) xz -dc "$path" >"$dest" ;;
        *.ko.zst) zstd -qdc "$path" >"$dest" ;;
        *.ko.gz) gzip -dc "$path" >"$dest" ;;
        *) cp "$path" "$dest" ;;
    esac
    echo "$mod" >>"$root/etc/modules.order"
done

cat >"$root/init" <<'INIT'
#!/bin/sh
# Guest side of the kernel NBD test. Every step prints TWB-PASS or TWB-FAIL.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp
mount -t tmpfs tmp /tmp

fail() {
    echo "TWB-FAIL: $1"
    echo "TWB-RESULT: FAIL"
    sync
    poweroff -f
    sleep 5
}
pass() { echo "TWB-PASS: $1"; }

host=10.0.2.2; port=10809; export=vol0; mode=basic; files=40
for arg in $(cat /proc/cmdline); do
    case $arg in
        twb.host=*) host=${arg#twb.host=} ;;
        twb.port=*) port=${arg#twb.port=} ;;
        twb.export=*) export=${arg#twb.export=} ;;
        twb.mode=*) mode=${arg#twb.mode=} ;;
        twb.files=*) files=${arg#twb.files=} ;;
    esac
done
echo "TWB-INFO: kernel $(uname -r), server $host:$port export $export"

for mod in $(cat /etc/modules.order); do
    insmod /lib/modules/$mod.ko || fail "insmod $mod"
done
pass "modules loaded"

ip link set lo up
ip link set eth0 up || fail "eth0 up"
ip addr add 10.0.2.15/24 dev eth0 || fail "eth0 address"
ip route add default via 10.0.2.2 || fail "default route"
pass "network up"

[ -b /dev/nbd0 ] || fail "/dev/nbd0 exists"

# Every file 1..$1 reads back with the checksum taken when it was written.
check_files() {
    i=1
    while [ $i -le $1 ]; do
        [ "$(md5sum /mnt/file.$i | cut -d' ' -f1)" = "$(cat /tmp/sum.$i)" ] || fail "file $i intact"
        i=$((i + 1))
    done
}

if [ "$mode" = failover ]; then
    # When the server goes away the kernel holds the requests (requeued after 5 s unanswered,
    # kept up to 120 s without a connection) and nbd-reconnect dials the same address again,
    # now served by the survivor.
    nbd-reconnect "$host" "$port" "$export" 0 5 120 &
    i=0
    while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
        i=$((i + 1))
        [ $i -le 100 ] || fail "nbd-reconnect attach"
        sleep 0.1
    done
    pass "attached /dev/nbd0 (reconnecting)"
    mkfs.ext4 -q -F /dev/nbd0 || fail "mkfs.ext4"
    mount -t ext4 /dev/nbd0 /mnt || fail "mount ext4"
    pass "mkfs.ext4 and mount"
    n=0
    while [ $n -lt $files ]; do
        n=$((n + 1))
        dd if=/dev/urandom of=/tmp/f bs=4096 count=8 2>/dev/null || fail "make file $n"
        md5sum /tmp/f | cut -d' ' -f1 >/tmp/sum.$n
        cp /tmp/f /mnt/file.$n || fail "write file $n"
        if [ $((n % 4)) -eq 0 ]; then
            sync || fail "sync after file $n"
            echo "TWB-SYNCED: $n"
        fi
    done
    sync || fail "final sync"
    pass "wrote and synced $files files"
    check_files $files
    umount /mnt || fail "umount"
    echo 3 > /proc/sys/vm/drop_caches
    e2fsck -fn /dev/nbd0 || fail "e2fsck -fn"
    pass "e2fsck clean"
    mount -t ext4 -o ro /dev/nbd0 /mnt || fail "remount ro"
    check_files $files
    umount /mnt
    pass "files intact after remount"
    nbd-client -d /dev/nbd0
    echo "TWB-RESULT: PASS"
    sync
    poweroff -f
    sleep 5
fi

nbd-client "$host" "$port" /dev/nbd0 -N "$export" -b 4096 || fail "nbd-client attach"
size=$(cat /sys/block/nbd0/size)
[ "$size" -gt 0 ] || fail "nbd0 has a size ($size sectors)"
pass "attached /dev/nbd0 ($size sectors)"

# Direct I/O: write a pattern at 0 and at 1 MiB, read back through the kernel driver, compare.
dd if=/dev/urandom of=/tmp/pattern bs=4096 count=256 2>/dev/null || fail "make pattern"
dd if=/tmp/pattern of=/dev/nbd0 bs=4096 count=256 oflag=direct 2>/dev/null || fail "dd write direct @0"
dd if=/tmp/pattern of=/dev/nbd0 bs=4096 count=256 seek=256 oflag=direct 2>/dev/null || fail "dd write direct @1MiB"
dd if=/dev/nbd0 of=/tmp/back0 bs=4096 count=256 iflag=direct 2>/dev/null || fail "dd read direct @0"
dd if=/dev/nbd0 of=/tmp/back1 bs=4096 count=256 skip=256 iflag=direct 2>/dev/null || fail "dd read direct @1MiB"
cmp /tmp/pattern /tmp/back0 || fail "read-back @0 matches"
cmp /tmp/pattern /tmp/back1 || fail "read-back @1MiB matches"
pass "direct write and read-back"

mkfs.ext4 -q -F /dev/nbd0 || fail "mkfs.ext4"
pass "mkfs.ext4"
mount -t ext4 /dev/nbd0 /mnt || fail "mount ext4"
dd if=/tmp/pattern of=/mnt/data bs=4096 count=256 conv=fsync 2>/dev/null || fail "write file"
sync
cmp /tmp/pattern /mnt/data || fail "file reads back"
umount /mnt || fail "umount"
pass "mount, write file, umount"
# Drop the page cache so e2fsck reads what the server holds.
echo 3 > /proc/sys/vm/drop_caches
e2fsck -fn /dev/nbd0 || fail "e2fsck -fn"
pass "e2fsck clean"
mount -t ext4 -o ro /dev/nbd0 /mnt || fail "remount ro"
cmp /tmp/pattern /mnt/data || fail "file reads back after remount"
umount /mnt
pass "file intact after remount"
nbd-client -d /dev/nbd0 || fail "nbd-client disconnect"
pass "detached"
echo "TWB-RESULT: PASS"
sync
poweroff -f
sleep 5
INIT
chmod 755 "$root/init"

mkdir -p "$(dirname "$out")"
tmp_out="$out.tmp.$$"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$tmp_out"
mv "$tmp_out" "$out"
echo "build-initramfs: wrote $out for kernel $kver (modules: ${module_order[*]%%:*})" >&2
