"""The guest kit (pyvirtio.vm): initramfs format, module ordering, markers, peers, and a
real boot.

The interop test boots each generation of peers (the system's QEMU with Debian 12's
kernel; QEMU 11.1 with Linux 7.3 from the private trixie root) with QEMU's OWN virtio
devices, proving the kit independently of any pyvirtio device.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import random
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvirtio.errors import ConfigurationError
from pyvirtio.vm import (
    DONE_MARKER,
    GENERATIONS,
    INSMOD_FAILED_MARKER,
    READY_MARKER,
    TRANSPORT_MODULES,
    CpioWriter,
    GuestKernel,
    GuestResult,
    GuestRunError,
    GuestVM,
    KernelModule,
    ModuleIndex,
    PeerGeneration,
    QemuPeer,
    build_initramfs,
    cache_root,
    fetch_kernel,
    marker_values,
    peer_generation,
    trixie_kernel,
    trixie_qemu,
)
from pyvirtio.vm.initramfs import DEFAULT_BUSYBOX, render_init
from pyvirtio.vm.kernel import extract_vmlinux, module_name, read_modinfo, read_module_bytes
from tests.peer_generations import resolve_peers

# -- helpers --------------------------------------------------------------------------


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """An independent newc reader: name -> (mode, data, (rdevmajor, rdevminor))."""
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (
            fields[1], fields[6], fields[9], fields[10], fields[11],
        )  # fmt: skip
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        body = (name_start + namesize + 3) & ~3
        content = data[body : body + filesize]
        pos = (body + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries[name] = (mode, content, (rmaj, rmin))


def fake_index(deps: dict[str, tuple[str, ...]], builtin: tuple[str, ...] = ()) -> ModuleIndex:
    mods = {n: KernelModule(n, Path(f"/m/{n}.ko"), d) for n, d in deps.items()}
    return ModuleIndex(Path("/m"), mods, builtin)


# -- CpioWriter -----------------------------------------------------------------------


def test_cpio_writer_round_trips_files_links_devices_and_parents() -> None:
    w = CpioWriter()
    w.add_file("/usr/lib/x/data.bin", b"abcde", 0o640)
    w.add_symlink("bin/sh", "/bin/busybox")
    w.add_device("dev/console", "c", 5, 1)
    w.add_directory("tmp", 0o1777)
    entries = parse_newc(w.finish())
    assert entries["usr/lib/x/data.bin"][1] == b"abcde"
    assert stat.S_IMODE(entries["usr/lib/x/data.bin"][0]) == 0o640
    for parent in ("usr", "usr/lib", "usr/lib/x", "bin"):
        assert stat.S_ISDIR(entries[parent][0])
    assert list(entries).index("usr") < list(entries).index("usr/lib/x/data.bin")
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"/bin/busybox"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    assert stat.S_IMODE(entries["tmp"][0]) == 0o1777


def test_cpio_writer_output_is_accepted_by_gnu_cpio(tmp_path: Path) -> None:
    cpio = shutil.which("cpio")
    if cpio is None:
        pytest.skip("cpio not installed (scripts/install-deps.sh)")
    w = CpioWriter()
    w.add_file("a/b.txt", b"hello\n")
    w.add_symlink("a/link", "b.txt")
    out = subprocess.run(
        [cpio, "-i", "-t", "--quiet"], input=w.finish(), capture_output=True, check=True
    )
    assert out.stdout.decode().split() == ["a", "a/b.txt", "a/link"]


def test_cpio_writer_rejects_duplicates_and_dotdot() -> None:
    w = CpioWriter()
    w.add_file("x", b"")
    with pytest.raises(ConfigurationError):
        w.add_file("/x", b"")
    with pytest.raises(ConfigurationError):
        w.add_file("a/../../etc/passwd", b"")
    with pytest.raises(ConfigurationError):
        w.add_device("d", "p", 1, 1)


# -- module ordering ------------------------------------------------------------------


def test_load_order_puts_dependencies_first_and_each_module_once() -> None:
    idx = fake_index(
        {
            "virtio_ring": (),
            "virtio": ("virtio_ring",),
            "virtio_pci": ("virtio_ring", "virtio"),
            "failover": (),
            "net_failover": ("failover",),
            "virtio_net": ("virtio_ring", "virtio", "net_failover"),
        }
    )
    names = [m.name for m in idx.load_order(["virtio_pci", "virtio_net", "virtio"])]
    assert names == [
        "virtio_ring",
        "virtio",
        "virtio_pci",
        "failover",
        "net_failover",
        "virtio_net",
    ]


def test_load_order_accepts_dash_spelling_and_skips_builtins() -> None:
    idx = fake_index({"virtio_rng": ("rng_core",)}, builtin=("rng_core",))
    assert [m.name for m in idx.load_order(["virtio-rng", "rng-core"])] == ["virtio_rng"]
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"


def test_load_order_reports_unknown_module_and_cycle() -> None:
    idx = fake_index({"a": ("b",), "b": ("a",)})
    with pytest.raises(ConfigurationError, match="cycle"):
        idx.load_order(["a"])
    with pytest.raises(ConfigurationError, match="not found"):
        idx.load_order(["nope"])


def test_read_modinfo_rejects_non_elf() -> None:
    with pytest.raises(ConfigurationError):
        read_modinfo(b"not an elf file at all, definitely not" * 4)


# -- kernel cache -----------------------------------------------------------------------


def _fake_cached_kernel(cache: Path, package: str) -> None:
    pkg_dir = cache / package
    (pkg_dir / "root/boot").mkdir(parents=True)
    (pkg_dir / "root/boot/vmlinuz-9.9.9-amd64").write_bytes(b"kernel")
    mdir = pkg_dir / "root/lib/modules/9.9.9-amd64"
    mdir.mkdir(parents=True)
    (mdir / "modules.dep").write_text("kernel/a.ko:\nkernel/b.ko: kernel/a.ko\n")
    (pkg_dir / "kernel.json").write_text(
        json.dumps(
            {
                "package": package,
                "version": "9.9.9-amd64",
                "vmlinuz": "root/boot/vmlinuz-9.9.9-amd64",
                "vmlinux": "",
                "modules_dir": "root/lib/modules/9.9.9-amd64",
            }
        )
    )
    (cache / "current.json").write_text(json.dumps({"package": package}))


def test_fetch_kernel_second_call_uses_only_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a complete cache entry, no apt tool is run (none is even on PATH)."""
    _fake_cached_kernel(tmp_path, "linux-image-9.9.9-amd64")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    kernel = fetch_kernel(tmp_path)
    assert kernel.version == "9.9.9-amd64"
    assert kernel.boot_image == kernel.vmlinuz
    assert [m.name for m in kernel.module_index().load_order(["b"])] == ["a", "b"]


def test_fetch_kernel_without_cache_or_apt_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigurationError, match="install-deps"):
        fetch_kernel(tmp_path / "cache")


def test_cache_root_honours_pyvirtio_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYVIRTIO_CACHE", str(tmp_path))
    assert cache_root() == tmp_path


# -- the second generation: layout, cache, chroot command line ------------------------


def test_guest_kernel_from_root_finds_the_7x_layout(tmp_path: Path) -> None:
    """Debian's 7.x packages keep vmlinuz in usr/lib/modules/KVER/ and have no /boot."""
    mdir = tmp_path / "usr/lib/modules/7.3.4+deb13-amd64"
    mdir.mkdir(parents=True)
    (mdir / "vmlinuz").write_bytes(b"image")
    kernel = GuestKernel.from_root(tmp_path, package="linux-image-7.3.4+deb13-amd64")
    assert kernel.version == "7.3.4+deb13-amd64"
    assert kernel.vmlinuz == mdir / "vmlinuz" and kernel.modules_dir == mdir


def _bzimage_with(payload: bytes) -> bytes:
    """A minimal x86 boot image whose setup header points at ``payload``."""
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 0, len(payload))
    return bytes(image) + payload


def test_extract_vmlinux_strips_the_size_trailer_of_a_zstd_payload() -> None:
    """The kernel's zstd payload ends with the uncompressed size (size_append), which
    zstd rejects as trailing data; 7.3 images are built so."""
    zstd = shutil.which("zstd")
    if zstd is None:
        pytest.fail("zstd missing: run scripts/install-trixie-peers.sh", pytrace=False)
    elf = b"\x7fELF" + random.Random(7).randbytes(5000)
    frame = subprocess.run([zstd, "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    assert extract_vmlinux(_bzimage_with(frame + struct.pack("<I", len(elf)))) == elf
    assert extract_vmlinux(_bzimage_with(frame + struct.pack("<I", len(elf) + 1))) is None


def test_read_module_bytes_decompresses_ko_xz(tmp_path: Path) -> None:
    mod = tmp_path / "virtio_blk.ko.xz"
    mod.write_bytes(lzma.compress(b"\x7fELF module", format=lzma.FORMAT_XZ))
    assert read_module_bytes(mod) == b"\x7fELF module"


def test_trixie_peers_missing_say_to_run_the_setup(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="install-trixie-peers"):
        trixie_qemu(tmp_path)
    with pytest.raises(ConfigurationError, match="install-trixie-peers"):
        trixie_kernel(tmp_path)
    with pytest.raises(ConfigurationError, match="unknown peer generation"):
        peer_generation("qemu1.0-linux2.0", tmp_path)


def test_chrooted_qemu_command_shares_paths_outside_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command is unshare + sh + chroot (exec all the way); the kernel's directory
    under the cache is bind-mounted, paths under /tmp are not (already shared)."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    root = Path("/var/cache/pv/trixie-root")
    peer = QemuPeer("qemu11.1", "/usr/bin/qemu-system-x86_64", root)
    kdir = Path("/var/cache/pv/kernel-trixie/k")
    cmd = peer.command(["-m", "64M"], share=[kdir / "vmlinux", tmp_path / "initrd"])
    assert cmd[1:4] == ["-m", "--propagation", "private"] and cmd[4:6] == ["sh", "-c"]
    script = cmd[6]
    assert 'exec chroot "$root" "$@"' in script and "mount --bind /tmp" in script
    assert cmd[8:] == [str(root), "1", str(kdir), "/usr/bin/qemu-system-x86_64", "-m", "64M"]
    with pytest.raises(ConfigurationError, match="contains the root"):
        peer.command([], share=[Path("/var/cache/pv/x")])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigurationError, match="needs root"):
        peer.command([])


def test_guest_vm_with_a_peer_uses_its_command(tmp_path: Path) -> None:
    class Recorder(QemuPeer):
        def command(self, args, share=()):  # type: ignore[no-untyped-def]
            return ["RECORD", *[str(p) for p in share], "--", *args]

    vm = GuestVM(tmp_path / "vmlinux", tmp_path / "initrd", peer=Recorder("test"))
    cmd = vm.command(tmp_path / "console.log")
    share = [str(tmp_path / "vmlinux"), str(tmp_path / "initrd"), str(tmp_path)]
    assert cmd[:5] == ["RECORD", *share, "--"]
    assert cmd[cmd.index("-kernel") + 1] == str(tmp_path / "vmlinux")


# -- init script and markers ----------------------------------------------------------


def test_init_loads_modules_in_order_then_runs_snippet_and_powers_off() -> None:
    script = render_init(["virtio_ring", "virtio", "virtio_blk"])
    lines = script.splitlines()
    mounts = [i for i, line in enumerate(lines) if line.startswith("mount ")]
    insmods = [line for line in lines if line.startswith("insmod ")]
    assert [s.split("/")[-1].split(".")[0] for s in insmods] == [
        "virtio_ring",
        "virtio",
        "virtio_blk",
    ]
    assert all(INSMOD_FAILED_MARKER in line for line in insmods)
    assert max(mounts) < lines.index(insmods[0])
    ready = lines.index(f"echo {READY_MARKER}")
    assert lines.index(insmods[-1]) < ready < lines.index("poweroff -f")
    assert any(DONE_MARKER in line for line in lines[ready:])


def test_marker_helpers_strip_cr_and_find_markers_after_kernel_noise() -> None:
    console = f"[ 1.0] boot\r\nRES 12\r\n[ 2.0] x: RES 34\r\n{DONE_MARKER} rc=3\r\n"
    assert marker_values(console, "RES") == ["12", "34"]
    result = GuestResult(console, 0, False, 1.0, "")
    assert result.guest_rc == 3
    with pytest.raises(GuestRunError, match="exited 3"):
        result.check()


# -- real boot ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_kernel() -> GuestKernel:
    """Debian's kernel from the pyvirtio cache (downloaded the first time)."""
    if shutil.which("qemu-system-x86_64") is None or not Path(DEFAULT_BUSYBOX).is_file():
        pytest.skip("qemu-system-x86_64 / busybox-static missing: run scripts/install-deps.sh")
    try:
        return fetch_kernel()
    except ConfigurationError as exc:
        pytest.skip(f"Debian guest kernel unavailable: {exc}")


@pytest.fixture(scope="module")
def peers(request: pytest.FixtureRequest) -> PeerGeneration:
    """The QEMU and guest kernel of one generation (``request.param``); the second
    must be set up (a failure, never a skip)."""
    return resolve_peers(str(request.param))


def test_trixie_kernel_modules_for_the_guest() -> None:
    """Linux 7.3 (set up by the script): virtio core and PCI built in, the drivers are
    .ko.xz modules the initramfs stores decompressed."""
    try:
        kernel = trixie_kernel()
    except ConfigurationError as exc:
        pytest.fail(str(exc), pytrace=False)
    index = kernel.module_index()
    assert kernel.version.startswith("7.")
    assert kernel.boot_image.name.startswith("vmlinux-"), "no PVH vmlinux extracted (zstd?)"
    for builtin in ("virtio", "virtio_ring", "virtio_pci", "virtio_console"):
        assert index.is_builtin(builtin), builtin
    assert index.get("virtio_blk").path.name == "virtio_blk.ko.xz"
    assert [m.name for m in index.load_order(TRANSPORT_MODULES)] == ["virtio_mmio"]


def test_initramfs_holds_busybox_modules_and_init(
    tmp_path: Path, guest_kernel: GuestKernel
) -> None:
    ird = build_initramfs(
        tmp_path / "i.gz", guest_kernel, "true", modules=["virtio_blk", "virtio-rng", "sd_mod"]
    )
    order = list(ird.modules)
    assert order[: len(TRANSPORT_MODULES)] == list(TRANSPORT_MODULES)
    for dep, user in [("scsi_mod", "sd_mod"), ("virtio", "virtio_blk"), ("virtio", "virtio_rng")]:
        assert order.index(dep) < order.index(user)
    entries = parse_newc(gzip.decompress(ird.path.read_bytes()))
    assert entries["bin/sh"][1] == b"/bin/busybox"
    for name in order:
        assert entries[f"lib/modules/{name}.ko"][1][:4] == b"\x7fELF"
    assert entries["dev/console"][2] == (5, 1)
    assert stat.S_IMODE(entries["init"][0]) & 0o111


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("peers", GENERATIONS, indirect=True)
def test_linux_virtio_blk_and_rng_drivers_against_qemu_devices(
    tmp_path: Path, peers: PeerGeneration, record_property: Callable[[str, object], None]
) -> None:
    """Peer: Linux virtio_blk/virtio-rng drivers against QEMU's own devices
    (virtio-blk-pci on a raw image, virtio-rng-pci), booted by the guest kit; both
    generations (Linux 6.1 + QEMU 7.2, Linux 7.3 + QEMU 11.1).

    The guest checksums the whole disk, writes a pattern at an offset (O_DIRECT) and
    reads it back, and reads /dev/hwrng; the host checks the checksum line and the
    image file byte for byte. Guest RAM is a shared memfd (the vhost-user setup).
    """
    disk_size = 4 << 20
    original = random.Random(0x5EED).randbytes(disk_size)
    image = tmp_path / "disk.img"
    image.write_bytes(original)
    pattern = bytes(range(256)) * 32  # 8 KiB
    block, seek = 4096, 300
    snippet = f"""set -e
sum=$(md5sum /dev/vda)
echo "BLK-MD5 $sum"
echo "BLK-SECTORS $(cat /sys/block/vda/size)"
echo "VIRTIO-IDS $(cat /sys/bus/virtio/devices/*/device | sort | tr '\\n' ' ')"
dd if=/pattern.bin of=/dev/vda bs={block} seek={seek} oflag=direct conv=notrunc 2>/dev/null
back=$(dd if=/dev/vda bs={block} skip={seek} count=2 iflag=direct 2>/dev/null | md5sum)
echo "BLK-READBACK $back"
echo "RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
rng=$(head -c 64 /dev/hwrng | od -An -tx1 -v | tr -d ' \\n')
echo "RNG-BYTES $rng"
"""
    ird = build_initramfs(
        tmp_path / "initramfs.gz",
        peers.kernel,
        snippet,
        modules=["virtio_blk", "virtio-rng"],
        files={"pattern.bin": pattern},
    )
    # Guest RAM in a shared memfd, as vhost-user back-ends will need it.
    vm = GuestVM(
        peers.kernel.boot_image, ird.path, memory_mib=256, shared_memory=True, peer=peers.qemu
    )
    vm.drive(f"if=none,id=d0,file={image},format=raw").device("virtio-blk-pci,drive=d0")
    vm.device("virtio-rng-pci")
    result = vm.run(timeout=300, console_path=tmp_path / "console.log").check()
    record_property("peer", f"{peers.name}: {peers.qemu.version()}, Linux {peers.kernel.version}")
    record_property("boot_seconds", round(result.elapsed, 2))
    print(f"{peers.name} guest run (boot + checks + poweroff): {result.elapsed:.1f} s")

    ctx = result.describe()
    assert result.marker_value("BLK-MD5").split() == [
        hashlib.md5(original).hexdigest(),
        "/dev/vda",
    ], ctx
    assert result.marker_value("BLK-SECTORS") == str(disk_size // 512), ctx
    assert result.marker_value("VIRTIO-IDS").split() == ["0x0002", "0x0004"], ctx
    assert result.marker_value("BLK-READBACK").split()[0] == hashlib.md5(pattern).hexdigest()
    assert result.marker_value("RNG-CURRENT").startswith("virtio_rng"), ctx
    rng = bytes.fromhex(result.marker_value("RNG-BYTES"))
    assert len(rng) == 64 and len(set(rng)) > 1, ctx

    expected = bytearray(original)
    expected[seek * block : seek * block + len(pattern)] = pattern
    assert image.read_bytes() == bytes(expected)


def test_run_times_out_and_leaves_no_qemu(tmp_path: Path) -> None:
    """A run that never ends is stopped at the timeout and the process is reaped.

    A stand-in for QEMU (a script that prints and sleeps) keeps this fast.
    """
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho fake qemu started\nexec sleep 3600\n")
    fake.chmod(0o755)
    vm = GuestVM(tmp_path / "vmlinuz", tmp_path / "initrd", qemu=str(fake), append=["quiet"])
    with vm.start() as guest:
        assert guest.alive()
        result = guest.wait(timeout=0.5)
        assert result.timed_out and not guest.alive()
    assert guest.process.returncode is not None
    assert "fake qemu started" in result.qemu_log
    assert "console=ttyS0 panic=-1 quiet" in result.command
    with pytest.raises(GuestRunError, match="timed out"):
        result.check()


def test_a_guest_qemu_refuses_shows_qemus_own_error(tmp_path: Path) -> None:
    """A QEMU that refuses its command line leaves an empty console: the diagnostics
    of a failed check carry QEMU's own message (QEMU 11 renamed ``reconnect``, say)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 missing: run scripts/install-deps.sh", pytrace=False)
    vm = GuestVM("/nonexistent-kernel", "/nonexistent-initrd")
    vm.chardev("socket,id=c0,path=/tmp/none.sock,no-such-option=1")
    with vm.start(tmp_path / "console.log") as guest:
        assert guest.wait_for("never", 10) is None
        text = guest.diagnostics()
    assert "qemu log: " in text and "(empty)" not in text.split("qemu log: ")[1].splitlines()[0]
