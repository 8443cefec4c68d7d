//! Parquet as Hugging Face `datasets` exports it: string columns for standard data,
//! `list<struct<role, content>>` columns for conversations, booleans for KTO labels. Rows are read
//! into JSON values so one validator serves every format; writing infers columns from the values.

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Float64Builder, Int64Builder, ListBuilder, StringBuilder, StructBuilder};
use arrow_array::{Array, ArrayRef, BooleanArray, LargeListArray, LargeStringArray, ListArray, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Number, Value};

use crate::error::RowError;
use crate::error::{DataError, Location, Result};

/// One cell as JSON; unsupported types are an error naming the type.
fn cell(array: &dyn Array, row: usize) -> std::result::Result<Value, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type};
    if array.is_null(row) {
        return Ok(Value::Null);
    }
    let num = |f: f64| Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null);
    Ok(match array.data_type() {
        DataType::Utf8 => Value::String(array.as_any().downcast_ref::<StringArray>().expect("utf8").value(row).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_any().downcast_ref::<LargeStringArray>().expect("utf8").value(row).to_string()),
        DataType::Boolean => Value::Bool(array.as_any().downcast_ref::<BooleanArray>().expect("bool").value(row)),
        DataType::Int8 => Value::from(array.as_primitive::<Int8Type>().value(row)),
        DataType::Int16 => Value::from(array.as_primitive::<Int16Type>().value(row)),
        DataType::Int32 => Value::from(array.as_primitive::<Int32Type>().value(row)),
        DataType::Int64 => Value::from(array.as_primitive::<Int64Type>().value(row)),
        DataType::UInt8 => Value::from(array.as_primitive::<UInt8Type>().value(row)),
        DataType::UInt16 => Value::from(array.as_primitive::<UInt16Type>().value(row)),
        DataType::UInt32 => Value::from(array.as_primitive::<UInt32Type>().value(row)),
        DataType::UInt64 => Value::from(array.as_primitive::<UInt64Type>().value(row)),
        DataType::Float32 => num(array.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => num(array.as_primitive::<Float64Type>().value(row)),
        DataType::List(_) => {
            let list = array.as_any().downcast_ref::<ListArray>().expect("list").value(row);
            Value::Array((0..list.len()).map(|i| cell(list.as_ref(), i)).collect::<std::result::Result<_, _>>()?)
        }
        DataType::LargeList(_) => {
            let list = array.as_any().downcast_ref::<LargeListArray>().expect("list").value(row);
            Value::Array((0..list.len()).map(|i| cell(list.as_ref(), i)).collect::<std::result::Result<_, _>>()?)
        }
        DataType::Struct(fields) => {
            let s = array.as_any().downcast_ref::<StructArray>().expect("struct");
            let mut obj = Map::new();
            for (i, f) in fields.iter().enumerate() {
                obj.insert(f.name().clone(), cell(s.column(i).as_ref(), row)?);
            }
            Value::Object(obj)
        }
        other => return Err(format!("unsupported Parquet column type {other}")),
    })
}

/// A name given twice among `fields` (columns, or a struct's fields), as a reason; JSON objects
/// would keep only one of them.
fn duplicate_names(fields: &Fields, column: Option<&str>) -> std::result::Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for f in fields {
        if !seen.insert(f.name()) {
            return Err(match column {
                None => format!("duplicate column \"{}\"", f.name()),
                Some(c) => format!("column \"{c}\" has a duplicate struct field \"{}\"", f.name()),
            });
        }
        let mut dtype = f.data_type();
        while let DataType::List(inner) | DataType::LargeList(inner) = dtype {
            dtype = inner.data_type();
        }
        if let DataType::Struct(inner) = dtype {
            duplicate_names(inner, Some(column.unwrap_or(f.name())))?;
        }
    }
    Ok(())
}

/// Every row of a Parquet file as a JSON object, with its row number.
pub fn read_values(path: &Path) -> Result<Vec<(Location, std::result::Result<Value, RowError>)>> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| DataError::at(path, None, format!("not a readable Parquet file: {e}")))?;
    duplicate_names(builder.schema().fields(), None).map_err(|reason| DataError::at(path, None, reason))?;
    let reader = builder
        .build()
        .map_err(|e| DataError::at(path, None, format!("not a readable Parquet file: {e}")))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| DataError::at(path, None, format!("cannot read Parquet data: {e}")))?;
        let schema = batch.schema();
        for row in 0..batch.num_rows() {
            let mut obj = Map::new();
            let mut err = None;
            for (i, field) in schema.fields().iter().enumerate() {
                match cell(batch.column(i).as_ref(), row) {
                    Ok(v) => {
                        obj.insert(field.name().clone(), v);
                    }
                    Err(e) => err = Some(format!("column \"{}\": {e}", field.name())),
                }
            }
            out.push((Location::Row(out.len()), err.map_or(Ok(Value::Object(obj)), |e| Err(RowError(e)))));
        }
    }
    Ok(out)
}

/// Column types dipole writes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Bool,
    Int,
    Float,
    Messages,
}

fn kind_of(v: &Value) -> Option<Kind> {
    match v {
        Value::String(_) => Some(Kind::Text),
        Value::Bool(_) => Some(Kind::Bool),
        Value::Number(n) if n.is_i64() => Some(Kind::Int),
        Value::Number(_) => Some(Kind::Float),
        Value::Array(_) => Some(Kind::Messages),
        // objects and nulls are stored as JSON text
        _ => None,
    }
}

fn message_fields() -> Fields {
    Fields::from(vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)])
}

/// Writes JSON objects as a Parquet file (snappy), one column per key of the first object.
pub fn write_values(path: &Path, rows: &[Value]) -> Result<()> {
    let io = |e: String| DataError::at(path, None, e);
    let first = rows.first().and_then(Value::as_object).ok_or_else(|| io("nothing to write".into()))?;
    let columns: Vec<(String, Kind)> = first
        .iter()
        .map(|(k, v)| (k.clone(), kind_of(v).unwrap_or(Kind::Text)))
        .collect();
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (name, kind) in &columns {
        let values = rows.iter().map(|r| r.get(name).cloned().unwrap_or(Value::Null));
        let (dtype, array): (DataType, ArrayRef) = match kind {
            Kind::Text => {
                let mut b = StringBuilder::new();
                for v in values {
                    match v {
                        Value::Null => b.append_null(),
                        Value::String(s) => b.append_value(s),
                        other => b.append_value(other.to_string()),
                    }
                }
                (DataType::Utf8, Arc::new(b.finish()))
            }
            Kind::Bool => {
                let mut b = BooleanBuilder::new();
                for v in values {
                    b.append_option(v.as_bool());
                }
                (DataType::Boolean, Arc::new(b.finish()))
            }
            Kind::Int => {
                let mut b = Int64Builder::new();
                for v in values {
                    b.append_option(v.as_i64());
                }
                (DataType::Int64, Arc::new(b.finish()))
            }
            Kind::Float => {
                let mut b = Float64Builder::new();
                for v in values {
                    b.append_option(v.as_f64());
                }
                (DataType::Float64, Arc::new(b.finish()))
            }
            Kind::Messages => {
                let inner = StructBuilder::new(message_fields(), vec![Box::new(StringBuilder::new()), Box::new(StringBuilder::new())]);
                let mut b = ListBuilder::new(inner);
                for v in values {
                    match v {
                        Value::Array(items) => {
                            for m in items {
                                let s = b.values();
                                for (i, key) in ["role", "content"].iter().enumerate() {
                                    let text = m.get(*key).and_then(Value::as_str).map(str::to_string);
                                    s.field_builder::<StringBuilder>(i).expect("string field").append_option(text);
                                }
                                s.append(true);
                            }
                            b.append(true);
                        }
                        _ => b.append(false),
                    }
                }
                let array = b.finish();
                (array.data_type().clone(), Arc::new(array))
            }
        };
        fields.push(Field::new(name, dtype, true));
        arrays.push(array);
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).map_err(|e| io(e.to_string()))?;
    let file = std::fs::File::create(path).map_err(|e| DataError::io(path, e))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(|e| io(e.to_string()))?;
    writer.write(&batch).map_err(|e| io(e.to_string()))?;
    writer.close().map_err(|e| io(e.to_string()))?;
    Ok(())
}
