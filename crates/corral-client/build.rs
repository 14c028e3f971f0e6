//! Generates the client from docs/openapi.json. The document is OpenAPI 3.1 (what utoipa emits);
//! progenitor reads 3.0 only, so it is first lowered, the way progenitor's maintainers suggest
//! (oxidecomputer/progenitor#762): `type: [T, "null"]` and a `oneOf` with a null variant become
//! `nullable`, a raw upload body becomes `format: binary`, 3.1-only fields go. Anything else
//! 3.1-only that the document grows fails the build here, so the lowering never silently drops
//! meaning.

use std::path::Path;

use serde_json::{json, Map, Value};

fn main() {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    println!("cargo::rerun-if-changed={}", doc.display());
    let text = std::fs::read_to_string(&doc).expect("read docs/openapi.json");
    let mut value: Value = serde_json::from_str(&text).expect("docs/openapi.json is JSON");
    lower(&mut value);
    let spec: openapiv3::OpenAPI =
        serde_json::from_value(value).expect("the lowered document is OpenAPI 3.0");
    let mut generator = progenitor::Generator::default();
    let tokens = generator
        .generate_tokens(&spec)
        .expect("progenitor generates a client from docs/openapi.json");
    let file = syn::parse2(tokens).expect("the generated client parses");
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("corral_client.rs");
    std::fs::write(out, prettyplease::unparse(&file)).expect("write the generated client");
}

/// Lowers the 3.1 document to 3.0 in place.
fn lower(doc: &mut Value) {
    assert_eq!(
        doc["openapi"], "3.1.0",
        "the build lowers OpenAPI 3.1.0 only"
    );
    doc["openapi"] = json!("3.0.3");
    if let Some(license) = doc
        .pointer_mut("/info/license")
        .and_then(Value::as_object_mut)
    {
        license.remove("identifier");
    }
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for op in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in op.values_mut() {
                let raw = op.pointer_mut("/requestBody/content/application~1octet-stream/schema");
                if let Some(schema) = raw {
                    *schema = json!({"type": "string", "format": "binary"});
                }
            }
        }
    }
    walk(doc);
}

fn walk(v: &mut Value) {
    match v {
        Value::Object(o) => {
            schema(o);
            o.values_mut().for_each(walk);
        }
        Value::Array(a) => a.iter_mut().for_each(walk),
        _ => {}
    }
}

/// Lowers one object, if it is a schema.
fn schema(o: &mut Map<String, Value>) {
    for only_31 in [
        "const",
        "prefixItems",
        "$defs",
        "unevaluatedProperties",
        "contentMediaType",
    ] {
        assert!(
            !o.contains_key(only_31),
            "docs/openapi.json uses `{only_31}`, which build.rs cannot lower to OpenAPI 3.0 yet"
        );
    }
    if let Some(Value::Array(types)) = o.get("type").cloned() {
        let nullable = types.iter().any(|t| t == "null");
        let rest: Vec<Value> = types.into_iter().filter(|t| t != "null").collect();
        let [one] = rest.as_slice() else {
            panic!("docs/openapi.json has a schema of several types {rest:?}, which OpenAPI 3.0 cannot say");
        };
        o.insert("type".into(), one.clone());
        if nullable {
            o.insert("nullable".into(), json!(true));
        }
    }
    for key in ["oneOf", "anyOf"] {
        let Some(Value::Array(variants)) = o.get(key).cloned() else {
            continue;
        };
        let null = json!({"type": "null"});
        if !variants.contains(&null) {
            continue;
        }
        let rest: Vec<Value> = variants.into_iter().filter(|v| *v != null).collect();
        o.remove(key);
        o.insert("nullable".into(), json!(true));
        match rest.as_slice() {
            [one] => {
                o.insert("allOf".into(), json!([one]));
            }
            _ => {
                o.insert(key.into(), Value::Array(rest));
            }
        }
    }
}
