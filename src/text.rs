//! Text that users name things with (datasets, tasks, chat sessions, keys).

/// Whether `c` changes the direction of the text around it (Unicode bidirectional controls:
/// embeddings, overrides, isolates and marks). In a name they can make `evil<RLO>gpj.exe` show as
/// `evilexe.jpg`, so names never keep them.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// A name as shown to people: without control characters, bidirectional controls or a byte
/// order mark, trimmed.
pub fn clean_name(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_control() && !is_bidi_control(*c) && *c != '\u{FEFF}')
        .collect::<String>()
        .trim()
        .to_string()
}

/// `path` as clients see it: relative to `base` (the data or models dir), so answers never
/// show where the server keeps its files. A path outside `base` shows as its file name.
pub fn relative_path(base: &std::path::Path, path: &str) -> String {
    let p = std::path::Path::new(path);
    match p.strip_prefix(base) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) if p.is_relative() => path.to_string(),
        Err(_) => p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

/// A path a client sent: relative to `base` as answers show them (or absolute as older
/// clients sent them), normalised to an absolute path under `base`. `None` when it leaves
/// `base` (`..`) — such a path names nothing of the client's.
pub fn resolve_client_path(base: &std::path::Path, path: &str) -> Option<std::path::PathBuf> {
    use std::path::Component;
    let p = std::path::Path::new(path.trim());
    let rel = match p.strip_prefix(base) {
        Ok(rel) => rel,
        Err(_) if p.is_relative() => p,
        Err(_) => return None,
    };
    let mut out = base.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (out != base).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_shown_and_read_back() {
        let base = std::path::Path::new("/srv/data");
        assert_eq!(
            relative_path(base, "/srv/data/datasets/u/x.json"),
            "datasets/u/x.json"
        );
        assert_eq!(relative_path(base, "/elsewhere/m.gguf"), "m.gguf");
        assert_eq!(
            resolve_client_path(base, "datasets/u/x.json").unwrap(),
            base.join("datasets/u/x.json")
        );
        assert_eq!(
            resolve_client_path(base, "./datasets/u/x.json").unwrap(),
            base.join("datasets/u/x.json")
        );
        assert_eq!(
            resolve_client_path(base, "/srv/data/datasets/u/x.json").unwrap(),
            base.join("datasets/u/x.json")
        );
        assert!(resolve_client_path(base, "../etc/passwd").is_none());
        assert!(resolve_client_path(base, "/etc/passwd").is_none());
        assert!(resolve_client_path(base, "").is_none());
    }

    #[test]
    fn names_lose_direction_overrides_and_controls() {
        assert_eq!(clean_name("evil\u{202E}gpj.exe"), "evilgpj.exe");
        assert_eq!(clean_name(" a\u{2066}b\u{2069}\u{200F}c\n "), "abc");
        assert_eq!(clean_name("\u{FEFF}名前"), "名前");
        assert_eq!(clean_name("plain name"), "plain name");
    }
}
