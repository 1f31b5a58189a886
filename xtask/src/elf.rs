//! Semantic comparison of two eBPF ELF objects: equal when they would load identically.
//!
//! Compared: every section's name, size and bytes, its relocations (by target name, not symbol
//! index), and the symbols defined in those sections (programs, maps, globals). Ignored: the BTF
//! (`.BTF`, `.BTF.ext`) and DWARF (`.debug_*`) sections and their relocations, which embed
//! absolute source paths that differ between checkouts, and the raw symbol/string tables, whose
//! contents are compared through the symbols instead.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use object::{
    File, Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind,
    SymbolKind, read::Section,
};

/// Describes every way `committed` and `built` differ (at most [`MAX_DIFFERENCES`] lines);
/// empty when they are equivalent.
pub fn differences(committed: &[u8], built: &[u8]) -> Result<Vec<String>> {
    let old = Summary::of(&File::parse(committed).context("parsing the committed object")?)?;
    let new = Summary::of(&File::parse(built).context("parsing the built object")?)?;
    let mut diffs = Vec::new();
    for (name, old_section) in &old.sections {
        match new.sections.get(name) {
            None => diffs.push(format!("section `{name}` is gone")),
            Some(new_section) if new_section != old_section => diffs.push(format!(
                "section `{name}` differs: committed {old_section}, fresh {new_section}"
            )),
            Some(_) => {}
        }
    }
    let added = new
        .sections
        .keys()
        .filter(|name| !old.sections.contains_key(*name));
    diffs.extend(added.map(|name| format!("section `{name}` is new")));
    for (what, old, new) in [
        ("relocation", &old.relocations, &new.relocations),
        ("symbol", &old.symbols, &new.symbols),
    ] {
        diffs.extend(
            old.difference(new)
                .map(|x| format!("{what} only in the committed object: {x}")),
        );
        diffs.extend(
            new.difference(old)
                .map(|x| format!("{what} only in the fresh build: {x}")),
        );
    }
    if diffs.len() > MAX_DIFFERENCES {
        let more = diffs.len() - MAX_DIFFERENCES;
        diffs.truncate(MAX_DIFFERENCES);
        diffs.push(format!("… and {more} more differences"));
    }
    Ok(diffs)
}

/// How many differences [`differences`] describes before summarizing the rest.
const MAX_DIFFERENCES: usize = 20;

/// Whether a section is left out of the comparison.
fn ignored(name: &str) -> bool {
    let target = name
        .strip_prefix(".rela")
        .or_else(|| name.strip_prefix(".rel"))
        .unwrap_or(name);
    matches!(
        target,
        ".BTF" | ".BTF.ext" | ".symtab" | ".strtab" | ".shstrtab"
    ) || target.starts_with(".debug_")
}

/// The compared parts of an object, each item rendered as a line.
struct Summary {
    /// Section name to its kind, size and a hash of its bytes.
    sections: BTreeMap<String, String>,
    relocations: BTreeSet<String>,
    symbols: BTreeSet<String>,
}

impl Summary {
    fn of(file: &File<'_>) -> Result<Self> {
        let compared = |section: &Section<'_, '_>| {
            section.name().is_ok_and(|name| !ignored(name))
                && section.kind() != SectionKind::Metadata
        };
        let mut sections = BTreeMap::new();
        let mut relocations = BTreeSet::new();
        for section in file.sections().filter(compared) {
            let name = section.name()?;
            let data = section.data()?;
            // The hash keeps messages short; any differing byte changes it.
            sections.insert(
                name.to_owned(),
                format!(
                    "{:?}, {} bytes, fnv1a {:016x}",
                    section.kind(),
                    section.size(),
                    fnv1a(data)
                ),
            );
            for (offset, reloc) in section.relocations() {
                let target = match reloc.target() {
                    RelocationTarget::Symbol(index) => {
                        let symbol = file.symbol_by_index(index)?;
                        match symbol.kind() {
                            SymbolKind::Section => file
                                .section_by_index(
                                    symbol.section_index().context("section symbol")?,
                                )?
                                .name()?
                                .to_owned(),
                            _ => symbol.name()?.to_owned(),
                        }
                    }
                    other => format!("{other:?}"),
                };
                relocations.insert(format!(
                    "`{name}`+{offset:#x} -> `{target}`{:+} ({:?})",
                    reloc.addend(),
                    reloc.flags()
                ));
            }
        }
        let mut symbols = BTreeSet::new();
        for symbol in file.symbols() {
            let Some(index) = symbol.section_index() else {
                continue;
            };
            let section = file.section_by_index(index)?;
            if !compared(&section)
                || matches!(symbol.kind(), SymbolKind::Section | SymbolKind::File)
            {
                continue;
            }
            symbols.insert(format!(
                "`{}` in `{}` at {:#x}, {} bytes ({:?}{})",
                symbol.name()?,
                section.name()?,
                symbol.address(),
                symbol.size(),
                symbol.kind(),
                if symbol.is_global() { ", global" } else { "" },
            ));
        }
        Ok(Self {
            sections,
            relocations,
            symbols,
        })
    }
}

/// 64-bit FNV-1a, to name section contents in messages.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::{cmd, ebpf::PREBUILT};

    fn prebuilt() -> Vec<u8> {
        fs::read(cmd::root().join(PREBUILT)).expect("the committed object exists")
    }

    /// Flips one byte in the middle of the first section named by `pick`.
    fn flip(object: &[u8], pick: impl Fn(&str, SectionKind) -> bool) -> Vec<u8> {
        let file = File::parse(object).unwrap();
        let section = file
            .sections()
            .find(|s| pick(s.name().unwrap(), s.kind()))
            .expect("a matching section");
        let (offset, size) = section.file_range().expect("section has file data");
        let mut changed = object.to_vec();
        changed[usize::try_from(offset + size / 2).unwrap()] ^= 0xff;
        changed
    }

    #[test]
    fn an_object_equals_itself() {
        let object = prebuilt();
        assert_eq!(differences(&object, &object).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_changed_program_is_detected() {
        let object = prebuilt();
        let changed = flip(&object, |_, kind| kind == SectionKind::Text);
        assert!(!differences(&object, &changed).unwrap().is_empty());
    }

    #[test]
    fn debug_info_is_ignored() {
        let object = prebuilt();
        for name in [".BTF", ".BTF.ext", ".debug_str"] {
            let changed = flip(&object, |n, _| n == name);
            assert_eq!(
                differences(&object, &changed).unwrap(),
                Vec::<String>::new(),
                "{name}"
            );
        }
    }
}
