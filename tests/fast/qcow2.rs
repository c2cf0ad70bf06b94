//! The qcow2 reader against images made by `qemu-img`, cross-checked with
//! `qemu-img info --output=json`.

use testkit::qemu;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ckptstore::testing::qcow2::{
    read_chain, read_image, Backing, BackingChain, ChainEnd, Image, Qcow2Error,
};
use qemu::{
    add_bitmap, create, disable_bitmap, info, info_bitmaps, info_chain, qemu_img, qemu_img_output,
    InUseWriter, InfoBitmap,
};
use serde_json::Value;

fn ours(image: &Image) -> Vec<InfoBitmap> {
    image
        .bitmaps
        .iter()
        .map(|b| (b.name.clone(), b.granularity, b.in_use, b.auto))
        .collect()
}

/// Compares one layer read by us with the same layer in `qemu-img info`.
fn compare(image: &Image, info: &Value) {
    let what = image.path.display();
    let data = &info["format-specific"]["data"];
    let version = match data["compat"].as_str() {
        Some("1.1") => 3,
        Some("0.10") => 2,
        other => panic!("{what}: compat {other:?}"),
    };
    assert_eq!(image.version, version, "{what}: version");
    assert_eq!(
        Some(image.cluster_size),
        info["cluster-size"].as_u64(),
        "{what}: cluster size"
    );
    assert_eq!(
        Some(image.virtual_size),
        info["virtual-size"].as_u64(),
        "{what}: virtual size"
    );
    assert_eq!(
        image.backing_file.as_deref(),
        info["backing-filename"].as_str(),
        "{what}: backing file"
    );
    assert_eq!(
        image.backing_format.as_deref(),
        info["backing-filename-format"].as_str(),
        "{what}: backing format"
    );
    assert_eq!(
        image.data_file.as_deref(),
        data["data-file"].as_str(),
        "{what}: data file"
    );
    assert_eq!(
        Some(image.dirty),
        info["dirty-flag"].as_bool(),
        "{what}: dirty flag"
    );
    if version == 3 {
        assert_eq!(
            Some(image.corrupt),
            data["corrupt"].as_bool(),
            "{what}: corrupt flag"
        );
    }
    match image.backing() {
        Backing::File(path) => {
            assert_eq!(
                Some(path.as_path()),
                info["full-backing-filename"].as_str().map(Path::new),
                "{what}"
            );
        }
        Backing::None => assert!(info.get("full-backing-filename").is_none(), "{what}"),
        Backing::Unreadable(name) => panic!("{what}: unexpected unreadable backing {name}"),
    }
    assert!(image.bitmaps_consistent, "{what}: bitmaps consistent");
    assert_eq!(ours(image), info_bitmaps(info), "{what}: bitmaps");
}

/// Reads one image, checks that reading changed no byte of it, compares it
/// with `qemu-img info`, and returns it.
fn check(path: &Path) -> Image {
    let before = fs::read(path).unwrap();
    let image = read_image(path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        before,
        fs::read(path).unwrap(),
        "reading changed {}",
        path.display()
    );
    compare(&image, &info(path));
    assert_eq!(image.path, path);
    image
}

/// Reads a chain and compares every layer with `qemu-img info --backing-chain`.
fn check_chain(path: &Path) -> BackingChain {
    let chain = read_chain(path).unwrap_or_else(|e| panic!("{e}"));
    let infos = info_chain(path);
    let raw_end = usize::from(matches!(chain.end, ChainEnd::NotQcow2 { .. }));
    assert_eq!(chain.layers.len() + raw_end, infos.len(), "chain length");
    for (image, info) in chain.layers.iter().zip(&infos) {
        compare(image, info);
    }
    chain
}

fn names(image: &Image) -> Vec<&str> {
    image.bitmaps.iter().map(|b| b.name.as_str()).collect()
}

#[test]
fn no_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "1G", &[]);
    let image = check(&img);
    assert!(image.bitmaps.is_empty());
    assert_eq!(
        (image.version, image.cluster_size, image.virtual_size),
        (3, 65536, 1 << 30)
    );
    assert_eq!(image.backing(), Backing::None);
}

#[test]
fn one_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "1G", &[]);
    add_bitmap(&img, "ckpt-1", None);
    let image = check(&img);
    assert_eq!(names(&image), ["ckpt-1"]);
    let bitmap = image.bitmap("ckpt-1").unwrap();
    assert!(bitmap.auto && !bitmap.in_use);
    assert_eq!(bitmap.granularity, 65536);
    assert_eq!(bitmap.raw_name, b"ckpt-1");
    assert!(image.bitmap("ckpt-2").is_none());
}

#[test]
fn three_bitmaps_enabled_and_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "10G", &[]);
    add_bitmap(&img, "a", None);
    add_bitmap(&img, "b", Some("1M"));
    add_bitmap(&img, "c", Some("4K"));
    disable_bitmap(&img, "a");
    disable_bitmap(&img, "c");
    let image = check(&img);
    assert_eq!(
        ours(&image),
        [
            ("a".into(), 65536, false, false),
            ("b".into(), 1 << 20, false, true),
            ("c".into(), 4096, false, false)
        ]
    );
}

#[test]
fn fifty_bitmaps_in_directory_order() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "1G", &[]);
    let want: Vec<String> = (0..50)
        .map(|i| format!("{:08x}-checkpoint-{i}", 0x9e37_79b9u32.wrapping_mul(i)))
        .collect();
    for name in &want {
        add_bitmap(&img, name, None);
    }
    let image = check(&img);
    assert_eq!(names(&image), want);
}

#[test]
fn granularities_from_512_bytes_to_2_gib() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "4G", &[]);
    let sizes = ["512", "64K", "1M", "2G"];
    for size in sizes {
        add_bitmap(&img, &format!("g{size}"), Some(size));
    }
    // QEMU refuses granularities outside 2^9..2^31.
    assert!(!qemu_img_output(&[
        "bitmap",
        "--add",
        "-g",
        "256",
        img.to_str().unwrap(),
        "small"
    ])
    .status
    .success());
    assert!(
        !qemu_img_output(&["bitmap", "--add", "-g", "4G", img.to_str().unwrap(), "big"])
            .status
            .success()
    );
    let image = check(&img);
    let granularities: Vec<u64> = image.bitmaps.iter().map(|b| b.granularity).collect();
    assert_eq!(granularities, [512, 64 << 10, 1 << 20, 2 << 30]);
}

#[test]
fn longest_name_is_1023_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "1G", &[]);
    let longest = "n".repeat(1023);
    add_bitmap(&img, &longest, None);
    assert!(
        !qemu_img_output(&["bitmap", "--add", img.to_str().unwrap(), &"n".repeat(1024)])
            .status
            .success()
    );
    add_bitmap(&img, "after", None);
    let image = check(&img);
    assert_eq!(names(&image), [longest.as_str(), "after"]);
}

#[test]
fn utf8_names() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "1G", &[]);
    let want = ["снимок-1", "快照", "bitmap 🧊 ❄", "Ωmega—ü"];
    for name in want {
        add_bitmap(&img, name, None);
    }
    let image = check(&img);
    assert_eq!(names(&image), want);
    assert_eq!(image.bitmap("快照").unwrap().raw_name, "快照".as_bytes());
}

#[test]
fn backing_chain_of_three_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, mid_dir) = (dir.path().join("base"), dir.path().join("mid"));
    fs::create_dir_all(&base_dir).unwrap();
    fs::create_dir_all(&mid_dir).unwrap();
    let base = base_dir.join("base.qcow2");
    let mid = mid_dir.join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, "2G", &[]);
    add_bitmap(&base, "c1", None);
    add_bitmap(&base, "c2", None);
    disable_bitmap(&base, "c1");
    disable_bitmap(&base, "c2");
    // mid names its backing file by absolute path, top by a relative one.
    create(&mid, "2G", &["-b", base.to_str().unwrap(), "-F", "qcow2"]);
    add_bitmap(&mid, "c2", None);
    disable_bitmap(&mid, "c2");
    add_bitmap(&mid, "c3", Some("128K"));
    disable_bitmap(&mid, "c3");
    create(&top, "2G", &["-b", "mid/../mid/mid.qcow2", "-F", "qcow2"]);
    add_bitmap(&top, "c3", Some("128K"));
    add_bitmap(&top, "c4", None);

    let chain = check_chain(&top);
    assert_eq!(chain.end, ChainEnd::NoBacking);
    let paths: Vec<&Path> = chain.layers.iter().map(|l| l.path.as_path()).collect();
    assert_eq!(
        paths,
        [
            top.as_path(),
            &dir.path().join("mid/../mid/mid.qcow2"),
            &base
        ]
    );
    let layer_names: Vec<Vec<&str>> = chain.layers.iter().map(names).collect();
    assert_eq!(
        layer_names,
        [vec!["c3", "c4"], vec!["c2", "c3"], vec!["c1", "c2"]]
    );
    assert_eq!(
        chain.layers[0].backing_file.as_deref(),
        Some("mid/../mid/mid.qcow2")
    );
    assert_eq!(chain.layers[1].backing_file.as_deref(), base.to_str());
    assert_eq!(chain.layers[1].backing_format.as_deref(), Some("qcow2"));

    // A relative image path resolves a relative backing name relative to it.
    let relative = read_image(&dir.path().join("top.qcow2")).unwrap();
    assert_eq!(
        relative.backing(),
        Backing::File(dir.path().join("mid/../mid/mid.qcow2"))
    );
}

#[test]
fn compressed_image_keeps_its_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.qcow2"), dir.path().join("dst.qcow2"));
    create(&src, "64M", &[]);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 4M",
            "-c",
            "write -z 8M 1M",
            src.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    add_bitmap(&src, "x", None);
    add_bitmap(&src, "y", Some("1M"));
    disable_bitmap(&src, "y");
    qemu_img(&[
        "convert",
        "-c",
        "--bitmaps",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    let image = check(&dst);
    assert_eq!(
        ours(&image),
        [
            ("x".into(), 65536, false, true),
            ("y".into(), 1 << 20, false, false)
        ]
    );
}

#[test]
fn smallest_and_largest_clusters() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, size) in [(512u64, "512"), (2 << 20, "2M")] {
        let img = dir.path().join(format!("c{size}.qcow2"));
        create(&img, "8G", &["-o", &format!("cluster_size={size}")]);
        add_bitmap(&img, "one", None);
        add_bitmap(&img, "two", Some("16M"));
        let image = check(&img);
        assert_eq!(image.cluster_size, cluster);
        assert_eq!(names(&image), ["one", "two"]);
    }
}

#[test]
fn external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("meta.qcow2");
    let data = dir.path().join("data.raw");
    create(
        &img,
        "1G",
        &["-o", &format!("data_file={}", data.display())],
    );
    add_bitmap(&img, "d1", None);
    add_bitmap(&img, "d2", Some("256K"));
    let image = check(&img);
    assert_eq!(image.data_file.as_deref(), data.to_str());
    assert_eq!(names(&image), ["d1", "d2"]);
}

#[test]
fn version_2_image() {
    let dir = tempfile::tempdir().unwrap();
    let (base, img) = (dir.path().join("base.qcow2"), dir.path().join("v2.qcow2"));
    create(&base, "1G", &["-o", "compat=0.10"]);
    create(
        &img,
        "1G",
        &["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"],
    );
    // QEMU stores no bitmaps in version 2 images.
    assert!(
        !qemu_img_output(&["bitmap", "--add", img.to_str().unwrap(), "b"])
            .status
            .success()
    );
    let image = check(&img);
    assert_eq!(image.version, 2);
    // The extensions of a version 2 image start right after its 72-byte header.
    assert_eq!(image.backing_format.as_deref(), Some("qcow2"));
    assert!(image.bitmaps.is_empty());
    let chain = check_chain(&img);
    assert_eq!(chain.layers.len(), 2);
}

#[test]
fn in_use_bitmap_from_a_killed_writer() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "1G", &[]);
    add_bitmap(&img, "live", None);
    // A writable open marks every bitmap in use at once.
    let writer = InUseWriter::start(&img);
    // Read while the image is open for writing.
    let live = read_image(&img).unwrap();
    assert!(live.bitmap("live").unwrap().in_use);
    writer.kill(); // SIGKILL to this child's pid

    add_bitmap(&img, "later", None);
    let image = check(&img);
    assert_eq!(
        ours(&image),
        [
            ("live".into(), 65536, true, true),
            ("later".into(), 65536, false, true)
        ]
    );
}

#[test]
fn cleared_autoclear_bit_makes_every_bitmap_stale() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "1G", &[]);
    add_bitmap(&img, "b1", None);
    add_bitmap(&img, "b2", None);
    let mut bytes = fs::read(&img).unwrap();
    bytes[88..96].fill(0);
    fs::write(&img, &bytes).unwrap();

    let out = qemu_img_output(&["info", "--output=json", img.to_str().unwrap()]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("all bitmaps are now considered inconsistent"),
        "{stderr}"
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    // QEMU ignores the extension: it lists no bitmaps at all.
    assert!(
        info["format-specific"]["data"].get("bitmaps").is_none(),
        "{info}"
    );

    let image = read_image(&img).unwrap();
    assert!(!image.bitmaps_consistent);
    assert_eq!(names(&image), ["b1", "b2"]);
    assert_eq!(bytes, fs::read(&img).unwrap());
}

/// The offsets of the bitmaps extension's data and of the bitmap directory.
fn bitmaps_ext(bytes: &[u8]) -> (usize, usize) {
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let mut at = be32(100);
    loop {
        let (kind, len) = (be32(at), be32(at + 4));
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            let dir = u64::from_be_bytes(bytes[at + 24..at + 32].try_into().unwrap());
            return (at + 8, dir as usize);
        }
        at += 8 + len.next_multiple_of(8);
    }
}

fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

#[test]
fn damaged_images_give_typed_errors() {
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    type Kind = fn(&Qcow2Error) -> bool;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.qcow2");
    create(&good, "1G", &[]);
    add_bitmap(&good, "b1", None);
    add_bitmap(&good, "b2", None);
    let orig = fs::read(&good).unwrap();
    let (ext, dir_at) = bitmaps_ext(&orig);
    let end = orig.len();

    let cases: Vec<(&str, Damage, Kind)> = vec![
        (
            "bad magic",
            Box::new(|b| put(b, 0, b"QFI\0")),
            Qcow2Error::is_not_qcow2,
        ),
        (
            "empty file",
            Box::new(std::vec::Vec::clear),
            Qcow2Error::is_not_qcow2,
        ),
        (
            "truncated header",
            Box::new(|b| b.truncate(90)),
            Qcow2Error::is_invalid,
        ),
        (
            "version 4",
            Box::new(|b| put(b, 4, &4u32.to_be_bytes())),
            Qcow2Error::is_unsupported,
        ),
        (
            "cluster bits 22",
            Box::new(|b| put(b, 20, &22u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "header length 96",
            Box::new(|b| put(b, 100, &96u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "unknown incompatible bit",
            Box::new(|b| put(b, 79, &[0x20])),
            Qcow2Error::is_unsupported,
        ),
        (
            "extension too large",
            Box::new(move |b| put(b, ext - 4, &0x10000u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "zero bitmaps",
            Box::new(move |b| put(b, ext, &0u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "more bitmaps than entries",
            Box::new(move |b| put(b, ext, &3u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "fewer bitmaps than entries",
            Box::new(move |b| put(b, ext, &1u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "reserved field",
            Box::new(move |b| put(b, ext + 4, &1u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "directory too big",
            Box::new(move |b| put(b, ext + 8, &(1u64 << 40).to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "directory offset beyond EOF",
            Box::new(move |b| put(b, ext + 16, &(1u64 << 40).to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "directory offset unaligned",
            Box::new(move |b| put(b, ext + 16, &(dir_at as u64 + 8).to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "directory cut short",
            Box::new(move |b| b.truncate(dir_at + 30)),
            Qcow2Error::is_invalid,
        ),
        (
            "unknown flag",
            Box::new(move |b| put(b, dir_at + 12, &6u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "bitmap type 2",
            Box::new(move |b| put(b, dir_at + 16, &[2])),
            Qcow2Error::is_invalid,
        ),
        (
            "granularity 2^8",
            Box::new(move |b| put(b, dir_at + 17, &[8])),
            Qcow2Error::is_invalid,
        ),
        (
            "granularity 2^32",
            Box::new(move |b| put(b, dir_at + 17, &[32])),
            Qcow2Error::is_invalid,
        ),
        (
            "name runs past the directory",
            Box::new(move |b| put(b, dir_at + 18, &1024u16.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "extra data",
            Box::new(move |b| put(b, dir_at + 20, &8u32.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "no bitmap table",
            Box::new(move |b| put(b, dir_at, &0u64.to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        (
            "L1 table too small",
            Box::new(|b| put(b, 24, &(1u64 << 50).to_be_bytes())),
            Qcow2Error::is_invalid,
        ),
        // One 64 KiB table cluster at granularity 2^9 covers 256 MiB of the 1 GiB disk.
        (
            "bitmap table too small",
            Box::new(move |b| put(b, dir_at + 17, &[9])),
            Qcow2Error::is_invalid,
        ),
    ];
    for (what, damage, kind) in cases {
        let mut bytes = orig.clone();
        damage(&mut bytes);
        let img = dir.path().join("bad.qcow2");
        fs::write(&img, &bytes).unwrap();
        let err = read_image(&img).expect_err(what);
        assert!(kind(&err), "{what}: {err}");
        assert_eq!(err.path(), img, "{what}");
        // QEMU refuses every one of these images too.
        let out = qemu_img_output(&["info", "-f", "qcow2", img.to_str().unwrap()]);
        assert!(!out.status.success(), "{what}: qemu-img info accepted it");
        assert!(read_chain(&img).is_err(), "{what}");
    }
    assert_eq!(end, orig.len());
}

#[test]
fn bitmap_table_beyond_eof_is_stricter_than_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "1G", &[]);
    add_bitmap(&img, "b1", None);
    let mut bytes = fs::read(&img).unwrap();
    let (_, dir_at) = bitmaps_ext(&bytes);
    let past_end = (bytes.len() as u64).next_multiple_of(65536) + 65536;
    put(&mut bytes, dir_at, &past_end.to_be_bytes());
    fs::write(&img, &bytes).unwrap();
    let err = read_image(&img).unwrap_err();
    assert!(
        err.is_invalid() && err.to_string().contains("beyond the end of the file"),
        "{err}"
    );
    // QEMU reads past the end as zeros and lists the bitmap.
    assert_eq!(
        info_bitmaps(&info(&img)),
        [("b1".into(), 65536, false, true)]
    );
}

#[test]
fn raw_base_ends_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "64M"]);
    create(&top, "64M", &["-b", "base.raw", "-F", "raw"]);
    add_bitmap(&top, "t", None);
    let chain = check_chain(&top);
    assert_eq!(chain.layers.len(), 1);
    assert_eq!(
        chain.end,
        ChainEnd::NotQcow2 {
            path: base.clone(),
            format: Some("raw".into())
        }
    );
    // A raw top image is not qcow2.
    assert!(read_chain(&base).unwrap_err().is_not_qcow2());
    assert!(read_image(&base).unwrap_err().is_not_qcow2());
}

#[test]
fn unrecorded_format_is_probed() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, mid, top) = (
        dir.path().join("base.raw"),
        dir.path().join("mid.qcow2"),
        dir.path().join("top.qcow2"),
    );
    qemu_img(&["create", "-q", "-f", "raw", raw.to_str().unwrap(), "64M"]);
    create(&mid, "64M", &["-b", "base.raw", "-F", "raw"]);
    create(&top, "64M", &["-b", "mid.qcow2", "-F", "qcow2"]);
    // Drop the recorded formats: the reader then looks at the magic.
    for img in [&mid, &top] {
        let mut bytes = fs::read(img).unwrap();
        let at = bytes
            .windows(4)
            .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
            .unwrap();
        put(&mut bytes, at, &0x1234_5678u32.to_be_bytes());
        fs::write(img, &bytes).unwrap();
    }
    let chain = read_chain(&top).unwrap();
    assert_eq!(chain.layers.len(), 2);
    assert_eq!(chain.layers[0].backing_format, None);
    assert_eq!(
        chain.end,
        ChainEnd::NotQcow2 {
            path: raw,
            format: None
        }
    );
}

#[test]
fn protocol_and_json_backing_names_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    let names = [
        "nbd://127.0.0.1:10809/export",
        "nbd:unix:/run/x.sock:exportname=a",
        "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"/x\"}}",
        "host:1234",
    ];
    for name in names {
        create(&img, "64M", &[]);
        qemu_img(&[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            name,
            "-F",
            "raw",
            img.to_str().unwrap(),
        ]);
        let image = read_image(&img).unwrap();
        assert_eq!(image.backing_file.as_deref(), Some(name));
        assert_eq!(image.backing(), Backing::Unreadable(name.into()));
        let chain = read_chain(&img).unwrap();
        assert_eq!(
            (chain.layers.len(), chain.end),
            (1, ChainEnd::Unreadable(name.into()))
        );
    }
}

#[test]
fn missing_backing_file_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    create(&img, "64M", &["-u", "-b", "gone.qcow2", "-F", "qcow2"]);
    let err = read_chain(&img).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(err.path(), dir.path().join("gone.qcow2"));
    assert!(read_image(&dir.path().join("nothing.qcow2"))
        .unwrap_err()
        .is_not_found());
}

#[test]
fn backing_loop_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    create(&a, "64M", &[]);
    create(&b, "64M", &["-b", "a.qcow2", "-F", "qcow2"]);
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
    ]);
    let err = read_chain(&b).unwrap_err();
    assert!(
        err.is_bad_chain() && matches!(err, Qcow2Error::Loop { .. }),
        "{err}"
    );
    assert_eq!(err.path(), b);
    assert!(
        !qemu_img_output(&["info", "--backing-chain", b.to_str().unwrap()])
            .status
            .success()
    );
    // An image naming itself through another path is the same file.
    let c = dir.path().join("c.qcow2");
    create(&c, "64M", &["-u", "-b", "./c.qcow2", "-F", "qcow2"]);
    assert!(matches!(
        read_chain(&c).unwrap_err(),
        Qcow2Error::Loop { .. }
    ));
}

#[test]
fn chain_depth_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let layer = |i: usize| dir.path().join(format!("l{i:04}.qcow2"));
    let template = dir.path().join("template.qcow2");
    create(
        &template,
        "64M",
        &[
            "-o",
            "cluster_size=512",
            "-u",
            "-b",
            "l9999.qcow2",
            "-F",
            "qcow2",
        ],
    );
    let bytes = fs::read(&template).unwrap();
    let at = bytes.windows(11).position(|w| w == b"l9999.qcow2").unwrap();
    let limit = ckptstore::testing::qcow2::MAX_CHAIN_DEPTH;
    for i in 0..limit {
        let mut copy = bytes.clone();
        put(&mut copy, at, format!("l{:04}.qcow2", i + 1).as_bytes());
        fs::write(layer(i), copy).unwrap();
    }
    let err = read_chain(&layer(0)).unwrap_err();
    assert!(
        matches!(err, Qcow2Error::TooDeep { limit: l, .. } if l == limit),
        "{err}"
    );
    assert_eq!(err.path(), layer(limit));

    // Exactly the limit is fine.
    create(&layer(limit - 1), "64M", &["-o", "cluster_size=512"]);
    let chain = read_chain(&layer(0)).unwrap();
    assert_eq!(
        (chain.layers.len(), chain.end),
        (limit, ChainEnd::NoBacking)
    );
    let last: &PathBuf = &chain.layers[limit - 1].path;
    assert_eq!(last, &layer(limit - 1));
}
