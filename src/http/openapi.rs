//! The OpenAPI 3.1 document: its frame (title, security scheme, tags, the deviations from
//! SPEC.md), filled by every handler's `#[utoipa::path]` when the router is built
//! ([`super::api`]). Served at `/openapi.json`; the web UI renders it at `/docs`.

use utoipa::Modify;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// Where the served document differs from `shared/SPEC.md` (seed 000's contract), so a
/// client written against it knows.
pub const DEVIATIONS: &str = "\
Deviations from the original contract (shared/SPEC.md):\n\
- Paths in answers (`file_path`, `model_path`, `dataset_path`, `output_dir`) are relative \
(to the data dir, the models dir or the task's folder); requests may send them the same way \
or absolute.\n\
- `GET /api/tasks/{id}` does not show the worker's process id.\n\
- `/api/files/models` lists base models with `model_id` = their name and `created_at` = \
their folder's time.\n\
- `POST /api/auth/register` also answers `role`; `/api/auth/login` also `refresh_expires_in`.\n\
- Registration, sign-in and password changes are throttled (429 with `Retry-After`); \
generation is limited per user and overall (429); a full disk is a 507.\n";

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT access token, or an API key (ft-…)")
                        .build(),
                ),
            );
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "ferrotune",
        description = "Self-hosted LLM fine-tuning and serving: accounts, datasets, training \
                       tasks with live events, models, chat (also OpenAI-compatible under /v1).",
        license(name = "Apache-2.0"),
    ),
    modifiers(&BearerAuth),
    components(schemas(super::error::ErrorBody)),
    tags(
        (name = "system", description = "Health, status, resources"),
        (name = "auth", description = "Accounts, sessions, API keys"),
        (name = "admin", description = "Administrators: every account, counts"),
        (name = "datasets", description = "Uploads, previews, downloads"),
        (name = "tasks", description = "Training tasks, their events, logs and artifacts"),
        (name = "evaluations", description = "Models scored on held-out rows or test sets, before and after"),
        (name = "models", description = "Base and trained models"),
        (name = "chat", description = "Chat and saved conversations"),
        (name = "openai", description = "OpenAI-compatible endpoints"),
    ),
)]
struct ApiDoc;

/// The document's frame, before the routes are added.
pub fn base() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let described = doc.info.description.take().unwrap_or_default();
    doc.info.description = Some(format!("{described}\n\n{DEVIATIONS}"));
    doc
}

/// The whole document, as the server serves it.
pub fn document() -> utoipa::openapi::OpenApi {
    super::api(1).1
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn routes(doc: &utoipa::openapi::OpenApi) -> BTreeSet<(String, String)> {
        let value = serde_json::to_value(doc).unwrap();
        let mut out = BTreeSet::new();
        for (path, item) in value["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                    out.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn is_openapi_3_1_with_every_operation_typed() {
        let doc = document();
        let value = serde_json::to_value(&doc).unwrap();
        assert_eq!(value["openapi"], "3.1.0");
        for (path, item) in value["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(!responses.is_empty(), "{method} {path}: no responses");
                for (status, r) in responses {
                    assert!(
                        r["description"].as_str().is_some_and(|d| !d.is_empty()),
                        "{method} {path} {status}: no description"
                    );
                }
                let ok = responses.iter().find(|(s, _)| s.starts_with('2'));
                assert!(ok.is_some(), "{method} {path}: no success response");
                assert!(
                    op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                    "{method} {path}: no tag"
                );
            }
        }
    }

    /// Every route the server has is registered with its schema: none is added to the axum
    /// router directly (that would leave it out of the document).
    #[test]
    fn no_route_bypasses_the_document() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
        let mut offenders = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                // The document itself is the one route outside it.
                let next = lines.get(i + 1).copied().unwrap_or("");
                let allowed =
                    line.contains("\"/openapi.json\"") || next.contains("\"/openapi.json\"");
                if line.trim_start().starts_with(".route(") && !allowed {
                    offenders.push(format!("{}:{}", entry.path().display(), i + 1));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "routes added without `routes!` (no schema): {offenders:?}"
        );
    }

    /// The README's API table names no route the document lacks.
    #[test]
    fn the_readme_names_only_documented_routes() {
        let readme = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"),
        )
        .unwrap();
        let documented = routes(&document());
        let mut missing = Vec::new();
        for line in readme.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() < 4 || !cells[2].starts_with('`') {
                continue;
            }
            let path = cells[2].trim_matches('`');
            if !path.starts_with('/') || path == "/openapi.json" || path == "/docs" {
                continue;
            }
            let path = path.split('?').next().unwrap_or(path);
            for method in cells[1].split('/') {
                let method = method.trim().to_string();
                if method.is_empty() {
                    continue;
                }
                // `{adapter|logs|checkpoint-N}`-style cells name one path parameter.
                let normalised = normalise(path);
                if !documented
                    .iter()
                    .any(|(m, p)| *m == method && normalise(p) == normalised)
                {
                    missing.push(format!("{method} {path}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "README routes missing from /openapi.json: {missing:?}"
        );
    }

    /// Path parameters compared by position, not name (`{id}` vs `{name}`).
    fn normalise(path: &str) -> String {
        path.split('/')
            .map(|seg| if seg.starts_with('{') { "{}" } else { seg })
            .collect::<Vec<_>>()
            .join("/")
    }
}
